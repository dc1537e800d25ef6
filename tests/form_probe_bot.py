"""A bot module for the tests (``BOT_MODULE=tests.form_probe_bot``): the example conversation, plus
a name step that can be held mid-handler after it changed the state.

A name starting with ``slow-`` on the first attempt: the handler sets the next state and data,
answers "working", then waits until the file ``PROBE_RELEASE_FILE`` exists (never, if unset)
before it returns. On a later attempt (the update run again by the next leader) it answers
"age? (attempt N from STATE)" with the state it ran against.

``PROBE_STRATEGY`` (an aiogram ``FSMStrategy`` name) is set through ``setup_dispatcher``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from aiogram import Dispatcher, F, Router
from aiogram.fsm.context import FSMContext
from aiogram.fsm.strategy import FSMStrategy
from aiogram.types import Message

from examples.conversation_bot import Form
from examples.conversation_bot import router as conversation

router = Router(name="probe")
POLL_SECONDS = 0.05


@router.message(Form.name, F.text.startswith("slow-"))
async def slow_name(message: Message, state: FSMContext, attempt: int, raw_state: str | None) -> None:
    if attempt == 1:
        await state.update_data(name=message.text)
        await state.set_state(Form.age)
        await message.answer("working")  # the state change is made (buffered for the done mark)
        release = os.environ.get("PROBE_RELEASE_FILE")
        while release is None or not await asyncio.to_thread(Path(release).exists):
            await asyncio.sleep(POLL_SECONDS)
        return
    await state.update_data(name=message.text)
    await state.set_state(Form.age)
    await message.answer(f"age? (attempt {attempt} from {raw_state})")


router.include_router(conversation)


def setup_dispatcher(dp: Dispatcher) -> None:
    strategy = os.environ.get("PROBE_STRATEGY")
    if strategy:
        dp.fsm.strategy = FSMStrategy[strategy]
