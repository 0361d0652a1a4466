"""Build the license eval tasks' data (evals/tasks/license/*.jsonl) from /usr/share/common-licenses.

    .venv/bin/python evals/make_license_tasks.py           # rewrites evals/tasks/license/*.jsonl (~2 s)
    .venv/bin/python evals/make_license_tasks.py --check   # exit 1 if the committed JSONL differs from its output

Needs only the standard library and `tokenizers` (a dependency of the package; the package itself is not imported).

The texts are the training corpus of the bundled small checkpoint (gemma4_eqx/assets/small, made by
scripts/train_small_checkpoint.py): Debian's canonical license files, each checked against the same SHA-256 as
the training script before it is read (the script stops, naming the file, if this machine holds another
version). Passages are cut from the *training* part only (the held-out GPL-3 sections 4-7 and Apache-2.0 are
never used), so a trained model should beat chance and a random one should not.

Two data files, one row per item, every string a verbatim slice of a license file:

* license_mc.jsonl (loglikelihood / multiple choice): `context` is 3 whole lines of a license plus the start of
  the next line, cut after a word; `choices` holds the true next WORDS_MC words of that line and 3 distractors,
  each WORDS_MC consecutive words from the middle of a line of another license; `gold` is the index of the true
  one (its position is drawn per item). A distractor is kept only if, appended to the context's last 3 words, it
  occurs nowhere in the corpus (so it is not also a valid continuation). Choices carry no leading space: the
  task's target_delimiter " " is the single space that follows the cut in the text.
* license_gen.jsonl (generate_until): the same kind of `context`; `target` is the next WORDS_GEN words.

Every choice is drawn so that a single space precedes it in its own file and its words are plain
(letters, apostrophes, hyphens, one trailing , ; . or :), so no choice stands out by its form.

Token boundaries. The small checkpoint's byte-fallback BPE merges a word with the space after it ("other▁",
", "), so for most cut points encode(context) is NOT a prefix of encode(context + " " + choice). lm-eval splits a
pair as context_enc = encode(context), continuation_enc = encode(context + continuation)[len(context_enc):] and
sends context_enc + continuation_enc, which then spells another text (a space or a whole word lost at the seam),
and a generation prompt ending in "other" asks the model to continue a token it never saw before a space. So an
item is kept only if, under that tokenizer (SHA-256 checked below), encode(context) is a prefix of
encode(context + " " + choice) for every choice (multiple choice) or for the target (generation). Other
tokenizers (the real Gemma 4 one) may still split some seams; the items remain valid text either way.
Selection is deterministic without a random-number generator: candidates are ranked by SHA-256 of
(SEED, purpose, license, index), so the files are the same on every machine and Python version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "tasks" / "license"
REPO = HERE.parent
sys.path.insert(0, str(REPO / "scripts"))
from license_corpus import heldout_bounds, read_training_files  # noqa: E402  (the corpus, shared with training)

TOKENIZER = REPO / "gemma4_eqx" / "assets" / "small" / "tokenizer.json"
TOKENIZER_SHA256 = "5134334ab5ba21d15ace0a1f2099f4fd3820b6c526dec284e3c3c589d7cfbe7e"

SEED = "gemma4-eqx-license-eval-1"
N_MC, N_GEN = 32, 32
WORDS_MC, WORDS_GEN = 5, 3
N_DISTRACTORS = 3
CONTEXT_LINES = 3            # whole lines before the cut line
MIN_CONTEXT_WORDS, MAX_CONTEXT_WORDS = 15, 60
# Items per license follow this cycle (the long texts more often; BSD and CC0 are short or unusual).
CYCLE = ["GPL-3", "GPL-2", "LGPL-2.1", "GFDL-1.3", "MPL-2.0", "MPL-1.1", "GPL-1", "LGPL-3",
         "Artistic", "GFDL-1.2", "LGPL-2", "CC0-1.0"]
PLAIN_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[,;.:]?")
WORD = re.compile(r"\S+")


def training_texts() -> dict[str, str]:
    """Each license's training text; GPL-3 without its held-out sections (replaced by a blank line)."""
    texts = read_training_files(made="the items")
    name, start, end = heldout_bounds(texts)
    texts[name] = texts[name][:start] + "\n" + texts[name][end:]
    return texts


def rank(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, (SEED, *parts))).encode()).hexdigest()


def normalized(s: str) -> str:
    return " ".join(s.split())


def spans(text: str, n_words: int) -> list[tuple[int, int, int]]:
    """(line start, cut, end): `n_words` plain words from `cut + 1` to `end` on one line, one space at `cut`,
    and at least one word before the cut on that line."""
    out, pos = [], 0
    for line in text.split("\n"):
        words = [(m.start() + pos, m.end() + pos) for m in WORD.finditer(line)]
        for i in range(1, len(words) - n_words + 1):
            cut = words[i - 1][1]
            if text[cut:words[i][0]] != " ":
                continue
            chosen = words[i:i + n_words]
            if all(PLAIN_WORD.fullmatch(text[a:b]) for a, b in chosen):
                out.append((pos, cut, chosen[-1][1]))
        pos += len(line) + 1
    return out


def context_before(text: str, line_start: int, cut: int) -> str | None:
    """CONTEXT_LINES whole lines before the cut line (fewer when the context would be too long) plus the cut
    line up to the cut; None when too short. Leading blank lines are dropped."""
    starts = [line_start]
    for _ in range(CONTEXT_LINES):
        if starts[-1] == 0:
            break
        starts.append(text.rfind("\n", 0, starts[-1] - 1) + 1)
    for start in reversed(starts):      # longest first
        ctx = text[start:cut].lstrip("\n")
        n = len(ctx.split())
        if n <= MAX_CONTEXT_WORDS:
            return ctx if n >= MIN_CONTEXT_WORDS else None
    return None


def load_encoder(path: pathlib.Path):
    """encode(text) -> ids without special tokens, from the small checkpoint's tokenizer (SHA-256 checked)."""
    if not path.is_file():
        raise SystemExit(f"{path}: missing; pass --tokenizer PATH/tokenizer.json (the small checkpoint's)")
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    if found != TOKENIZER_SHA256:
        raise SystemExit(f"{path}: SHA-256 {found}, expected {TOKENIZER_SHA256}: another tokenizer (was the small "
                         "checkpoint retrained?). Update TOKENIZER_SHA256 and rerun to rewrite the items")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def seam_kept(encode, context: str, continuation: str) -> bool:
    """lm-eval's split (context_enc, whole[len(context_enc):]) spells context + " " + continuation."""
    c = encode(context)
    return encode(context + " " + continuation)[:len(c)] == c


def candidates(texts: dict[str, str], name: str, n_words: int, purpose: str) -> list[tuple[str, str]]:
    """(context, continuation) pairs of one license, in their deterministic order."""
    text = texts[name]
    found = []
    for k, (line_start, cut, end) in enumerate(spans(text, n_words)):
        ctx = context_before(text, line_start, cut)
        if ctx is not None:
            found.append((rank(purpose, name, k), ctx, text[cut + 1:end]))
    found.sort()
    return [(c, t) for _, c, t in found]


def pick_items(texts: dict[str, str], n: int, n_words: int, purpose: str, encode, accept=None) -> list[dict]:
    """n items, licenses in CYCLE order, each with a kept seam; `accept(item)` may refuse one (then the license's
    next candidate is tried)."""
    pools = {name: candidates(texts, name, n_words, purpose) for name in CYCLE}
    used_contexts: set[str] = set()
    items = []
    for i in range(n):
        name = CYCLE[i % len(CYCLE)]
        while True:
            if not pools[name]:
                raise SystemExit(f"{name}: out of candidates for {purpose} item {i}")
            ctx, cont = pools[name].pop(0)
            key = normalized(ctx)[-40:]   # one item per passage
            item = {"id": f"{purpose}-{i:02d}", "license": name, "context": ctx, "target": cont}
            if (key not in used_contexts and seam_kept(encode, ctx, cont)
                    and (accept is None or accept(item))):
                used_contexts.add(key)
                break
        items.append(item)
    return items


def distractor_picker(texts: dict[str, str], encode):
    """accept(item) for multiple choice: finds N_DISTRACTORS spans of other licenses for the item (see the module
    doc), each with a kept seam, places the true continuation at a drawn index; False if too few are found."""
    corpus = " \n ".join(normalized(t) for t in texts.values())
    pool = sorted((rank("distractor", name, k), name, texts[name][cut + 1:end])
                  for name in texts for k, (_, cut, end) in enumerate(spans(texts[name], WORDS_MC)))
    used: set[str] = set()

    def accept(item: dict) -> bool:
        tail = " ".join(item["context"].split()[-3:])
        chosen: list[str] = []
        for _, name, span in pool:
            if name == item["license"] or span in used or normalized(span) == normalized(item["target"]):
                continue
            if normalized(tail + " " + span) in corpus or any(normalized(span) == normalized(c) for c in chosen):
                continue
            if not seam_kept(encode, item["context"], span):
                continue
            chosen.append(span)
            if len(chosen) == N_DISTRACTORS:
                break
        if len(chosen) < N_DISTRACTORS:
            return False
        used.update(chosen)
        gold = int(rank("gold", item["id"]), 16) % (N_DISTRACTORS + 1)
        item["choices"] = chosen[:gold] + [item["target"]] + chosen[gold:]
        item["gold"] = gold
        return True

    return accept


def build(tokenizer: pathlib.Path = TOKENIZER) -> dict[str, str]:
    encode = load_encoder(tokenizer)
    texts = training_texts()
    mc = pick_items(texts, N_MC, WORDS_MC, "mc", encode, accept=distractor_picker(texts, encode))
    gen = pick_items(texts, N_GEN, WORDS_GEN, "gen", encode)
    mc_rows = [{k: it[k] for k in ("id", "license", "context", "choices", "gold")} for it in mc]
    gen_rows = [{k: it[k] for k in ("id", "license", "context", "target")} for it in gen]
    dump = lambda rows: "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    return {"license_mc.jsonl": dump(mc_rows), "license_gen.jsonl": dump(gen_rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--tokenizer", type=pathlib.Path, default=TOKENIZER,
                        help="the small checkpoint's tokenizer.json (SHA-256 checked)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out, write nothing")
    args = parser.parse_args()
    files = build(args.tokenizer)
    if args.check:
        stale = [n for n, s in files.items() if not (args.out / n).is_file() or (args.out / n).read_text() != s]
        if stale:
            raise SystemExit(f"{', '.join(stale)}: differ from what {pathlib.Path(__file__).name} writes; rerun it")
        print(f"{len(files)} files up to date in {args.out}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name, s in files.items():
        (args.out / name).write_text(s)
        print(f"wrote {args.out / name} ({s.count(chr(10))} items)")


if __name__ == "__main__":
    sys.exit(main())
