"""The conversation workload of ``throughput.py --workload conversation``: each update reads and
writes FSM state (one ``get_state``, one ``set_state``) and replies, as a dialogue step does.

The same module runs in both candidates: solobot (``BOT_MODULE=bench.conversation_bot``, state in
its store, committed with the done marks) and plain aiogram (``aiogram_ping.py`` with the same
``BOT_MODULE``, aiogram's default ``MemoryStorage``).
"""

from __future__ import annotations

from aiogram import Router
from aiogram.filters import Command
from aiogram.fsm.context import FSMContext
from aiogram.types import Message

router = Router(name="conversation-bench")
#: The two states a chat alternates between.
STEP_A, STEP_B = "Step:a", "Step:b"


@router.message(Command("ping"))
async def step(message: Message, state: FSMContext) -> None:
    current = await state.get_state()
    await state.set_state(STEP_B if current == STEP_A else STEP_A)
    await message.reply("pong")
