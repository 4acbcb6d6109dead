"""`data.resume`: what a resumed run does with the checkpoint's data position.

exact (default): continue the stream exactly where the checkpoint left it; a checkpoint
    whose stream differs from the configured one (sources, weights, files, tokenizer, seed,
    ...) is refused with a DataError, since the tokens seen would differ.
restart: a phase change (a new mixture, e.g. DeepSeek-V3's long-context extension): when the
    checkpoint's stream differs from the configured one, the new stream starts from its
    beginning, and the model, optimizer and step are kept. A checkpoint made by the same
    stream still resumes exactly, so a requeue within the new phase replays nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from .config import RESUME_POLICIES
from .errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["RESUME_POLICIES", "restore_position"]


def restore_position(stream: Any, state: dict, policy: str, step: int, loud: bool = True) -> bool:
    """Load the saved position `state` into the fresh `stream` (policy `data.resume`).

    Returns True if the stream resumed exactly, False if it restarted from its beginning.
    The stream is fresh (never read), and a refused state leaves it at its beginning."""
    try:
        stream.load_state_dict(state)
        return True
    except DataError as e:
        if policy != "restart":
            raise DataError(f"{e}; to keep the model, optimizer and step and start the new data from its "
                            "beginning (a new training phase), set data.resume=restart") from None
        if loud:
            banner = "=" * 100
            logger.warning("\n%s\ndata.resume=restart: the checkpoint's data stream does not match the configured "
                           "data (%s).\nThe new mixture's stream starts from its beginning; model, optimizer and "
                           "step %d are kept.\n%s", banner, e, step, banner)
        stream.load_state_dict(stream.state_dict())  # the beginning: the stream has read nothing
        return False
