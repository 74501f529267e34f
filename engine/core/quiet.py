"""Known, harmless third-party warnings kept out of the studio's terminal and the Train tab's log, where they read
as alarms to people: each is named by its logger and a phrase of its message, with the reason it is harmless here.
Anything else those libraries say still shows."""

from __future__ import annotations

import logging

KNOWN_NOISE = {
    # bitsandbytes looks for optional CPU 4-bit kernels on the hub; we use its 8-bit optimizers only
    "bitsandbytes.backends.cpu.ops": "kernels-community",
    # transformers prefers torchvision's image processors but falls back to the PIL ones, which we use on purpose
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    # DeepSpeed finds no GPU: on a CPU-only machine (the demo, CI) that is the expected case, said in the header
    "DeepSpeed": "Setting accelerator to CPU",
}


class _DropPhrase(logging.Filter):
    def __init__(self, phrase: str):
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


def quiet_known_noise() -> None:
    """Filter the KNOWN_NOISE messages; call before the libraries are imported (their loggers may not exist yet)."""
    for name, phrase in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPhrase) and f.phrase == phrase for f in logger.filters):
            logger.addFilter(_DropPhrase(phrase))
