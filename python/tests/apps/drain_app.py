"""An app run as its own process by test_signals.py: ``python drain_app.py
CONFIG``. Its handler takes 20 ms per message, so a signal lands mid-run."""

import asyncio
import logging
import sys

import flowgate

app = flowgate.App(sys.argv[1])


@app.handler("work")
async def work(msg: flowgate.Message) -> flowgate.Output:
    logging.getLogger("shop").info("working")
    await asyncio.sleep(0.02)
    return flowgate.Output(msg.body)


if __name__ == "__main__":
    app.run()
