"""The run's BPE tokenizer on a node: as the coordinator names it at join, verified, kept in --state-dir.

A BPE run (``train.tokenizer = "bpe"``) is trained once by the coordinator; every join reply names
its SHA-256, and carries its JSON to a node that may be an origin and does not hold that one yet.
The node refuses JSON whose hash is not the named one (``TokenizerError``: it would encode its data
differently from every other origin), and keeps the tokenizer in ``DIR/tokenizer.json`` so a
restarted node does not fetch it again. A cached file that was changed has another hash: the
coordinator then sends the run's again, which replaces it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.tokenizer import BpeTokenizer, TokenizerError, sha256_hex

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


def cached_sha256(state_dir: str) -> str:
    """SHA-256 of the tokenizer a state directory keeps ("" none): what a join tells the coordinator."""
    if not state_dir:
        return ""
    try:
        return sha256_hex((Path(state_dir) / TOKENIZER_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return ""


def tokenizer_from_join(reply: pb.JoinReply, state_dir: str, *, has_data: bool) -> BpeTokenizer | None:
    """The run's tokenizer per a join reply (None: bytes, or a node that never is an origin)."""
    sha = reply.tokenizer_sha256
    if not sha or not has_data:
        return None
    if reply.tokenizer_json:
        tokenizer = BpeTokenizer.from_json(reply.tokenizer_json, sha256=sha)   # refuses another hash
        if state_dir:
            try:
                tokenizer.save(Path(state_dir) / TOKENIZER_FILE)
            except OSError as exc:   # the cache saves a fetch, never costs the run
                log.warning("cannot keep the tokenizer in %s: %s", state_dir, exc)
    elif state_dir:
        tokenizer = BpeTokenizer.load(Path(state_dir) / TOKENIZER_FILE, sha256=sha)
    else:
        raise TokenizerError(f"the coordinator named tokenizer {sha[:16]}... but sent no JSON, and this node "
                             "keeps none (no --state-dir)")
    log.info("the run's BPE tokenizer: %d tokens, sha256 %s", tokenizer.vocab_size, tokenizer.sha256[:16])
    return tokenizer
