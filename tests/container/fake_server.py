"""The fake Bot API on a chosen address: as a service on compose's network in the container test.

``python -m testbed.fake_bot_api serve`` listens on 127.0.0.1 only, which the bots in other
containers cannot reach; this listens where it is told (``--host 0.0.0.0`` inside its container).
"""

from __future__ import annotations

import argparse
import asyncio

from testbed.fake_bot_api import FakeBotAPI


async def serve(host: str, port: int) -> None:
    fake = FakeBotAPI()
    await fake.start(host=host, port=port)
    print(f"fake Bot API on http://{host}:{fake.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.container.fake_server")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
