"""The Llama-2 tokenizer of an OpenVLA checkpoint, and a tiny offline one with the same id layout.

OpenVLA checkpoints ship the Llama-2 SentencePiece tokenizer (32000 pieces) plus ``<PAD>`` = 32000 as
``tokenizer.json``. It is read here with ``tokenizers`` directly: under transformers 5 ``AutoTokenizer`` with
the file's ``tokenizer_class: "LlamaTokenizer"`` rebuilds the model and silently degrades to byte tokens.

The tiny tokenizer keeps the ids the policy depends on -- ``<unk>``/``<s>``/``</s>`` = 0/1/2, byte pieces
``<0x00>``..``<0xFF>`` = 3..258 (so ``"\\n"`` -> 13), ``"▁"`` = 29871, ``<PAD>`` = 32000 -- and fills the
rest of the 32000-piece vocabulary with common words, letters and unused pieces. It needs no download.

Example:
    >>> import tempfile
    >>> from srpo_rl.models.llama_tokenizer import load_llama_tokenizer, save_tiny_llama_tokenizer
    >>> d = tempfile.mkdtemp()
    >>> save_tiny_llama_tokenizer(d)
    >>> tok = load_llama_tokenizer(d)
    >>> ids = tok.encode("In: pick up the bowl?\\nOut:").ids
    >>> ids[0], 13 in ids, tok.token_to_id("<PAD>")
    (1, True, 32000)
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "SPIECE_UNDERLINE_ID",
    "build_tiny_llama_tokenizer",
    "load_llama_tokenizer",
    "save_tiny_llama_tokenizer",
]

BOS_ID, EOS_ID, PAD_ID = 1, 2, 32000
SPIECE_UNDERLINE_ID = 29871  # "▁": appended to every OpenVLA prompt that does not already end with it
_BASE_VOCAB = 32000
_SPIECE = "\u2581"

# Words of LIBERO instructions and the OpenVLA prompt, so that tiny prompts tokenise into word pieces
# (a realistic length) instead of single characters.
_WORDS = (
    "In Out What action should the robot take to pick up put place open close turn on off push "
    "and in of into onto top it both a an bowl plate black white cream cheese butter ketchup tomato "
    "sauce alphabet soup milk orange juice bbq salad dressing chocolate pudding basket box cabinet "
    "drawer middle bottom stove microwave wine bottle rack mug left right front back caddy book "
    "frying pan moka pots pot cookie ramekin wooden tray table next between center shelf ruler "
    "yellow red green porcelain flat the"
).split()


def _pieces() -> list[str]:
    """The 32000 pieces of the tiny vocabulary, in id order."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    chars = [chr(c) for c in range(33, 127)]
    useful = [_SPIECE + w for w in dict.fromkeys(_WORDS)] + ["Out", "In"] + [_SPIECE + c for c in chars] + chars
    useful = [p for p in dict.fromkeys(useful) if p not in pieces]
    pieces += useful
    if len(pieces) > SPIECE_UNDERLINE_ID:
        raise AssertionError("tiny vocabulary overflows the fixed '▁' id")
    pieces += [f"<unused_{i}>" for i in range(len(pieces), SPIECE_UNDERLINE_ID)]
    pieces.append(_SPIECE)
    pieces += [f"<unused_{i}>" for i in range(len(pieces), _BASE_VOCAB)]
    return pieces


def build_tiny_llama_tokenizer() -> Tokenizer:
    """A Llama-2-compatible tokenizer (same special, byte and ``"▁"`` ids; ``<PAD>`` = 32000), built offline.

    A Unigram model where every ordinary piece has the same score, so the shortest segmentation wins;
    characters outside the vocabulary fall back to byte pieces exactly as Llama-2's do.
    """
    vocab = [(piece, 0.0 if i < 3 else -1.0) for i, piece in enumerate(_pieces())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPIECE), normalizers.Replace(" ", _SPIECE)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPIECE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken("<PAD>", normalized=False, special=True)])
    if tok.token_to_id("<PAD>") != PAD_ID:
        raise AssertionError("tiny tokenizer: <PAD> did not land on id 32000")
    return tok


def _added_token_entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def save_tiny_llama_tokenizer(path: str | Path) -> None:
    """Writes the tiny tokenizer as the files an OpenVLA checkpoint carries.

    ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and ``added_tokens.json``
    with the contents transformers 4.40.1 writes for the real one (``tokenizer.model``, the SentencePiece
    binary, is not written: nothing here reads it).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_llama_tokenizer().save(str(path / "tokenizer.json"))
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): _added_token_entry(t) for i, t in ((0, "<unk>"), (1, "<s>"), (2, "</s>"), (PAD_ID, "<PAD>"))
        },
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": "<PAD>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special = {
        name: {k: v for k, v in _added_token_entry(t).items() if k != "special"}
        for name, t in (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "<PAD>"), ("unk_token", "<unk>"))
    }
    for name, content in (
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", special),
        ("added_tokens.json", {"<PAD>": PAD_ID}),
    ):
        (path / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def load_llama_tokenizer(path: str | Path) -> Tokenizer:
    """Loads ``tokenizer.json`` of a checkpoint directory, checking the ids OpenVLA prompts rely on.

    Returns a ``tokenizers.Tokenizer`` whose ``encode`` prepends ``<s>`` (as the Llama-2 one does).
    """
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {str(path)!r}: an OpenVLA checkpoint directory carries it")
    tok = Tokenizer.from_file(str(file))
    tok.no_padding()
    tok.no_truncation()
    expected = {"<s>": BOS_ID, "</s>": EOS_ID, "<PAD>": PAD_ID, _SPIECE: SPIECE_UNDERLINE_ID}
    wrong = {t: tok.token_to_id(t) for t, i in expected.items() if tok.token_to_id(t) != i}
    if wrong:
        raise ValueError(f"{file} is not a Llama-2 + <PAD> tokenizer: ids {wrong}, expected {expected}")
    if tok.encode("a").ids[:1] != [BOS_ID]:
        raise ValueError(f"{file} does not prepend <s> (id {BOS_ID}); its post-processor must add it")
    return tok
