"""The engine's dead-letter reasons (the ``x-flowgate-reason`` values the
engine writes itself; a handler's ``DeadLetter(reason)`` writes its own).

>>> flowgate.reasons.INVALID_OUTPUT
'invalid-output'
"""

from typing import Final

from ._flowgate import REASONS as _R

#: An exception and no retry ladder.
HANDLER_ERROR: Final[str] = _R["HANDLER_ERROR"]
#: The handler crashed the engine's task (never from Python code).
PANIC: Final[str] = _R["PANIC"]
#: The retry ladder's attempts are used up.
MAX_ATTEMPTS: Final[str] = _R["MAX_ATTEMPTS"]
#: The body is not the stage's ``payload`` type.
MALFORMED: Final[str] = _R["MALFORMED"]
#: The ``message_id`` was not UTF-8.
MALFORMED_ID: Final[str] = _R["MALFORMED_ID"]
#: The body exceeds ``[limits] max_message_bytes``.
OVERSIZED: Final[str] = _R["OVERSIZED"]
#: No queue is bound for an output.
UNROUTABLE: Final[str] = _R["UNROUTABLE"]
#: No ``message_id`` and the dedup policy rejects such messages.
MISSING_ID: Final[str] = _R["MISSING_ID"]
#: An ordered stage's delivery without a key (``order_by``, with
#: ``missing_key = "reject"``).
MISSING_KEY: Final[str] = _R["MISSING_KEY"]
#: A missing or wrong HMAC signature.
BAD_SIGNATURE: Final[str] = _R["BAD_SIGNATURE"]
#: The handler returned something that is not a result, or an output the
#: broker cannot take.
INVALID_OUTPUT: Final[str] = _R["INVALID_OUTPUT"]
#: The metric label of a handler's own ``DeadLetter`` reason.
HANDLER: Final[str] = _R["HANDLER"]
#: The dedup store refused the claim.
DEDUP_ERROR: Final[str] = _R["DEDUP_ERROR"]
