"""Token counts with Wan's own UMT5 tokenizer against its 512-token prompt limit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.core.models import load_wan_tokenizer

WAN_TOKEN_LIMIT = 512  # the Wan pipeline pads/cuts prompts to 512 UMT5 tokens


TOKEN_WARNING_FRACTION = 0.9  # warn when a caption uses this share of the limit


# ---------------------------------------------------------------------------------------------- token counts

@dataclass(frozen=True)
class TokenCount:
    tokens: int
    limit: int

    @property
    def warning(self) -> str:
        if self.tokens > self.limit:
            return (f"{self.tokens} tokens: over Wan's {self.limit}-token limit, the text encoder cuts everything "
                    f"after token {self.limit}. Shorten the caption.")
        if self.tokens >= TOKEN_WARNING_FRACTION * self.limit:
            return f"{self.tokens} tokens: close to Wan's {self.limit}-token limit."
        return ""


class TokenCounter:
    """Counts tokens as the Wan pipeline's UMT5 tokenizer sees a prompt (special tokens included, no truncation)."""

    def __init__(self, tokenizer, limit: int = WAN_TOKEN_LIMIT):
        self.tokenizer = tokenizer
        self.limit = limit

    @classmethod
    def for_wan_model(cls, wan_source: str | Path, limit: int = WAN_TOKEN_LIMIT) -> "TokenCounter":
        return cls(load_wan_tokenizer(wan_source), limit)

    def count(self, text: str) -> TokenCount:
        ids = self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return TokenCount(len(ids), self.limit)
