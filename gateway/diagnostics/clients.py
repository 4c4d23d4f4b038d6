"""The connected clients of a diagnostics server (the status socket, the HTTP listener).

Each accepted connection runs in its own task. `ClientTasks.serve` runs one: it refuses the
client (with the server's own words) beyond `max_clients`, ends quietly when the peer goes
away or the server closes, and always closes the connection. `cancel_all` ends every one of
them when the server closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class ClientTasks:
    def __init__(self, max_clients: int) -> None:
        self.max_clients = max_clients
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    async def serve(
        self,
        writer: asyncio.StreamWriter,
        serve: Callable[[], Awaitable[None]],
        refuse: Callable[[], Awaitable[None]],
        quiet: tuple[type[BaseException], ...] = (ConnectionError,),
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if len(self._tasks) > self.max_clients:
                await refuse()
                return
            await serve()
        except quiet:
            pass
        except asyncio.CancelledError:
            # cancel_all() cancels us. End normally: Python 3.11's stream machinery calls
            # task.exception() on this task and would log a cancelled one as an error.
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
