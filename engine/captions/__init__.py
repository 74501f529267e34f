"""Stage 2, captions: caption files with history and undo, BLIP-2 suggestions, and "pure style" rules (the Captions
tab).

- `store`: caption files and their history, suggestions, table export/import. `text`: caption errors.
- `style`: trigger word, replacements, banned words, normaliser. `tokens`: Wan token counts.
- `captioners`: BLIP-2 (transformers) and batch suggestion.

The caption of `clip.mp4` is `clip.txt` beside it (diffusion-pipe's convention), UTF-8, written atomically. What the
studio knows about captions lives in a hidden folder inside the clips folder, so the clips folder stays a valid
diffusion-pipe dataset:

    clips/.captions/history/<clip stem>.jsonl   every save of that caption (new text, previous text, source)
    clips/.captions/suggestions.jsonl           captioner suggestions and what became of them (accepted, ignored)
    clips/.captions/originals/                  the bytes of non-UTF-8 caption files replaced with consent

A suggestion never replaces a caption by itself: the UI offers accept / append / ignore, and the command line only
writes captions for clips that have none unless `--overwrite` is given (and even then the old text stays in history).

Command line:
    python -m engine.captions suggest CLIPS_DIR [--model PATH] [--overwrite] [--frames 3] [--prompt TEXT]
    python -m engine.captions apply-style CLIPS_DIR --rules FILE [--dry-run]
    python -m engine.captions find-replace CLIPS_DIR FIND REPLACE [--regex] [--dry-run]
    python -m engine.captions export CLIPS_DIR OUT.jsonl|OUT.csv
    python -m engine.captions import CLIPS_DIR IN.jsonl|IN.csv [--keep-existing] [--dry-run]
    python -m engine.captions undo CLIPS_DIR CLIP
    python -m engine.captions check CLIPS_DIR [--rules FILE] [--wan PATH]
"""
