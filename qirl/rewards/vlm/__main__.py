"""`python -m qirl.rewards.vlm`: rebuild the embedded VLM's shipped tokenizer (qirl/assets/vlm/tokenizer.json).

Run it after the Shapes grammar, the rating templates or the annotation reasons change; the test
`test_embedded_tokenizer_has_single_token_digits_and_qwen_specials` says when.
"""

from __future__ import annotations

import logging

from qirl.rewards.vlm.tokenizer import ASSET_DIR, build_tokenizer

logger = logging.getLogger("qirl.rewards.vlm")


def main() -> None:
    tok = build_tokenizer()
    ASSET_DIR.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(ASSET_DIR / "tokenizer.json"))
    logger.info("wrote %s (%d tokens)", ASSET_DIR / "tokenizer.json", len(tok))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
