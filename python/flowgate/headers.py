"""The engine's header names (from the engine itself, never retyped).

>>> flowgate.headers.REASON
'x-flowgate-reason'
"""

from typing import Final

from ._flowgate import HEADERS as _H

#: The handling attempt of a retried copy (1 first).
ATTEMPT: Final[str] = _H["ATTEMPT"]
#: On a dead letter: how many attempts were made.
ATTEMPTS: Final[str] = _H["ATTEMPTS"]
#: On a dead letter: why (a reason of :mod:`flowgate.reasons`, or the
#: handler's own ``DeadLetter`` reason).
REASON: Final[str] = _H["REASON"]
#: On a dead letter: the stage that dead-lettered it.
STAGE: Final[str] = _H["STAGE"]
#: On a dead letter: the last error (bounded).
ERROR: Final[str] = _H["ERROR"]
#: On a dead letter: the queue it was consumed from.
QUEUE: Final[str] = _H["QUEUE"]
#: On a retried copy: the failure that retried it.
LAST_ERROR: Final[str] = _H["LAST_ERROR"]
#: On a dead letter or retried copy: where it was first published to.
ORIGINAL_EXCHANGE: Final[str] = _H["ORIGINAL_EXCHANGE"]
#: On a dead letter or retried copy: its first routing key.
ORIGINAL_ROUTING_KEY: Final[str] = _H["ORIGINAL_ROUTING_KEY"]
#: When the message first entered the pipeline (ms since the epoch).
FIRST_PUBLISHED: Final[str] = _H["FIRST_PUBLISHED"]
#: The HMAC signature (with a ``[security]`` key).
SIGNATURE: Final[str] = _H["SIGNATURE"]
