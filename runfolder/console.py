"""The terminal of every stage (scripts/*.py): our own progress bars, summaries and warnings; not the
libraries' loading bars, INFO lines and deprecation notices.

Each script calls :func:`quiet_libraries` first thing in its Hydra ``main`` and runs its work inside
:func:`stage_console` (all but the study's commands, which draw no progress bar). What reaches the console and the log file is set by ``conf/hydra/job_logging/stage.yaml``:
the root logger at WARNING (libraries that log INFO straight on it, as open_clip does, stay quiet), our packages'
loggers (``anyms``, ``eval``, ``runfolder``, ``scripts``) at INFO, the console showing just the message
(:class:`ConsoleFormatter`), the file ``<hydra output dir>/<job>.log`` with time, logger and level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

# Read by these libraries when they are imported: a stage that imports them later is quiet from the start.
# setdefault: a user who sets one (e.g. DIFFUSERS_VERBOSITY=info to debug a load) keeps it.
LIBRARY_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's download bars, and transformers' "Loading weights"
    "HF_HUB_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}


def quiet_libraries() -> None:
    """Library chatter off for this process: huggingface_hub, transformers and diffusers at ERROR with their
    progress bars off, and FutureWarnings / DeprecationWarnings ignored (notices about a library's own API,
    for whoever upgrades it: the test suite still shows them). Idempotent (each job of a multirun calls it).

    Libraries already imported are switched through their own API (diffusers has no environment switch for its
    "Loading pipeline components" bars, and is imported by the generation stage's modules at start-up); the others
    read :data:`LIBRARY_ENVIRONMENT` when they are imported.
    """
    for key, value in LIBRARY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import utils as hub_utils

        hub_utils.disable_progress_bars()
        hub_utils.logging.set_verbosity_error()
    for name in ("transformers", "diffusers"):
        if name in sys.modules:
            library_logging = __import__(f"{name}.utils.logging", fromlist=["logging"])
            library_logging.set_verbosity_error()
            library_logging.disable_progress_bar()


@contextlib.contextmanager
def stage_console():
    """Log lines printed above our progress bars rather than through them (tqdm's ``logging_redirect_tqdm``
    on the root logger's console handler; the log file's handler is left as it is)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


class ConsoleFormatter(logging.Formatter):
    """A summary line as it is; a warning or error with its level in front (``warning: ...``), so it stands out
    without the time and logger name the log file keeps."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message
