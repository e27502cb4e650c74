"""The Stable Diffusion-layout testbed (`testbed-sd`): SD 1.x's component classes at canvas scale.

An `AutoencoderKL` maps 16x16 canvas images to a small latent grid (4 x 8 x 8), a
`CLIPTextModel` reads a `CLIPTokenizer` whose byte-level BPE vocabulary is built here,
offline, with the `tokenizers` library, and a `UNet2DConditionModel` denoises the latents
with cross-attention over the text encoder's states. Saved by `T2IModel.save_pretrained`,
the folder loads untouched with `diffusers.StableDiffusionPipeline.from_pretrained`.

The tokenizer follows openai/CLIP `clip/simple_tokenizer.py` (`bytes_to_unicode`, the
`</w>` end-of-word suffix, the word-splitting pattern, `<|startoftext|>`/`<|endoftext|>`)
and the vocabulary layout of its `bpe_simple_vocab_16e6.txt`: the 256 byte symbols, the
same with `</w>`, one token per merge in merge order, then the two specials.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from torch import nn

from diffunlearn.backends.diffusers_t2i import HFTokenizer, T2IModel
from diffunlearn.data import canvas

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's pre-tokenization: specials, English contractions, letter runs, single digits, other symbol runs
CLIP_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
WORD_LIST = Path(__file__).resolve().parent.parent / "data" / "common-words.txt"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters:
    printable Latin-1 bytes map to themselves, the others to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def common_words(path: Path = WORD_LIST) -> list[str]:
    return [w for line in path.read_text().splitlines() if (w := line.strip()) and not w.startswith("#")]


def tokenizer_corpus(words: Sequence[str] | None = None) -> list[str]:
    """What the BPE vocabulary is learned from: every prompt the canvas trains on, once each
    (full, partial and generic; so template words and concept names are frequent), then the
    common-word list once each (so a user's words split into English pieces, not bytes)."""
    styles = (*canvas.ALL_STYLES, canvas.GENERIC_STYLE)
    objects = (*canvas.ALL_OBJECTS, canvas.GENERIC_OBJECT)
    prompts = [canvas.full_prompt(s, o) for s in styles for o in objects]
    prompts += [canvas.object_prompt(o) for o in objects] + [canvas.style_prompt(s) for s in styles]
    return prompts + list(common_words() if words is None else words)


def _clip_pipeline(tokenizer) -> None:
    """CLIPTokenizer's normalizer and pre-tokenizer (transformers' tokenization_clip.py)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])


def learn_merges(corpus: Iterable[str], num_merges: int, max_token_length: int | None) -> list[tuple[str, str]]:
    """The first `num_merges` BPE merges of `corpus` (greedy, so a prefix of the full list),
    learned by `tokenizers`' BpeTrainer over CLIP's byte-level words with the `</w>` suffix.

    `max_token_length` caps a merged token's length: long, rare words (like "Van Gogh" in
    CLIP) stay several tokens even when the corpus would merge them whole.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    _clip_pipeline(tokenizer)
    # The trainer breaks ties between equally frequent pairs by token id. It numbers the plain
    # symbols in sorted order but would number the `</w>` symbols as it meets them in a hash map,
    # which differs from run to run; declaring them up front fixes their ids, hence the merges.
    end_symbols = [s + END_OF_WORD for s in sorted(bytes_to_unicode().values())]
    trainer = trainers.BpeTrainer(
        vocab_size=1 << 20, min_frequency=0, show_progress=False, special_tokens=end_symbols,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD, max_token_length=max_token_length,
    )
    tokenizer.train_from_iterator(list(corpus), trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    if len(merges) < num_merges:
        raise ValueError(f"the corpus yields only {len(merges)} merges; asked for {num_merges}")
    return [tuple(m) for m in merges[:num_merges]]


def clip_vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + `</w>`, merged tokens in merge order, specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def build_clip_tokenizer(folder: str | Path, vocab_size: int = 1280, max_token_length: int | None = 8,
                         model_max_length: int = 77, words: Sequence[str] | None = None) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) learned from the canvas prompts and the common-word list.

    Deterministic: the same arguments give byte-identical files. `vocab_size` counts the
    512 byte symbols and the 2 specials, as CLIP's 49,408 does.
    """
    folder = Path(folder)
    merges = learn_merges(tokenizer_corpus(words), vocab_size - 2 * 256 - 2, max_token_length)
    vocab = clip_vocabulary(merges)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": False, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
    return folder


def reference_tokenizer(folder: str | Path):
    """The folder's vocabulary as a plain `tokenizers.Tokenizer` with CLIP's pipeline and
    post-processing (<|startoftext|> ... <|endoftext|>): what CLIPTokenizer must agree with."""
    from tokenizers import Tokenizer, decoders, models, processors

    folder = Path(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                     end_of_word_suffix=END_OF_WORD, unk_token=EOS, fuse_unk=False))
    _clip_pipeline(tokenizer)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return tokenizer


def multi_token_concepts(tokenizer: HFTokenizer) -> dict[str, list[str]]:
    """Canvas concept names (and generic words) that the tokenizer splits, with their pieces."""
    names = [*canvas.ALL_STYLES, *canvas.ALL_OBJECTS, canvas.GENERIC_STYLE, canvas.GENERIC_OBJECT]
    out = {}
    for name in names:
        ids = tokenizer.ids(name, special=False)
        if len(ids) > 1:
            out[name] = tokenizer.tokens(ids)
    return out


# ---- the autoencoder ---------------------------------------------------------------------------

def build_vae(arch: Mapping) -> nn.Module:
    """A small AutoencoderKL: `image_size` pixels -> `latent_channels` x (image_size / 2^(levels-1))^2."""
    from diffusers import AutoencoderKL

    channels = tuple(arch["channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=arch["layers_per_block"],
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=arch["latent_channels"], norm_num_groups=arch["norm_groups"],
        sample_size=arch["image_size"], scaling_factor=1.0, mid_block_add_attention=arch["mid_attention"],
    )


# ---- the text-to-image model ---------------------------------------------------------------------

def build_testbed_sd(tokenizer_dir: str | Path, vae, arch: Mapping) -> T2IModel:
    """A freshly initialised testbed-sd model: a trained, frozen `vae`, the CLIP tokenizer in
    `tokenizer_dir`, a new CLIPTextModel and a new UNet2DConditionModel on the latents."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = HFTokenizer(Path(tokenizer_dir))
    specials = {name: tokenizer.token_id(token) for name, token in (("bos", BOS), ("eos", EOS))}
    text_config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=arch["text_dim"], intermediate_size=4 * arch["text_dim"],
        num_hidden_layers=arch["text_layers"], num_attention_heads=max(1, arch["text_dim"] // 32),
        max_position_embeddings=tokenizer.max_length, pad_token_id=specials["eos"],
        bos_token_id=specials["bos"], eos_token_id=specials["eos"],
    )
    text_encoder = CLIPTextModel(text_config)
    channels = tuple(arch["channels"])
    attention = [i >= arch["attention_from"] for i in range(len(channels))]
    latent_size = arch["image_size"] // 2 ** (len(vae.config.block_out_channels) - 1)
    # diffusers' `attention_head_dim` is the number of heads (a known naming quirk): heads of
    # >= 16 channels each keep the CPU attention kernel efficient (TESTBED.md).
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        layers_per_block=arch["layers_per_block"], block_out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=arch["text_dim"], attention_head_dim=arch["heads"],
        norm_num_groups=arch["norm_groups"],
    )
    # steps_offset=1 as Stable Diffusion's schedulers (StableDiffusionPipeline warns otherwise); our DDIM follows it
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=arch["beta_schedule"], clip_sample=False,
                              steps_offset=1)
    meta = {"kind": "testbed-sd", "image_size": arch["image_size"], "guidance_scale": arch["guidance_scale"],
            "sample_steps": 25, "latent": True}
    return T2IModel(unet, text_encoder, tokenizer, scheduler, vae=vae, meta=meta)
