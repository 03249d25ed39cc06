"""The prompts a sweep is judged by, built for the model's world.

  mini / tiny   the mini world's own prompts (klein_sweep/mini/prompts.py)
  real models   prompts for the user's subject, from data.trigger and the subject's class word:
                a character LoRA ("photo of ohwx woman in a cafe", a portrait, a full-body shot,
                a drawing) with the class word without the trigger as the leak probe ("photo of
                a woman") and unrelated scenes as the prior; a style LoRA (no class word in the
                captions) with scenes in the style and the same scenes without it

The class word is data.class_word, or the word that most often follows the trigger in the
captions ("photo of [trigger] woman smiling" -> woman). Prompts a user sets (eval.trigger_prompts,
eval.prior_prompts) are kept as they are, except the mini world's on a real model: they name
creatures the real model has never seen, so every metric would measure the wrong thing.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from klein_sweep.errors import ConfigError
from klein_sweep.mini import prompts as mini

# Words that can follow the trigger without naming the subject's class ("ohwx in a cafe",
# "ohwx, smiling", "ohwx style"): a caption whose trigger is followed by one of them names no class.
_NOT_A_CLASS = {
    "in", "on", "at", "with", "and", "by", "of", "from", "for", "to", "as", "is", "wearing", "holding",
    "standing", "sitting", "smiling", "looking", "style", "art", "artwork", "painting", "aesthetic",
}
_ARTICLES = {"a", "an", "the"}
# A class word must follow the trigger in at least this share of the captions that hold it.
CLASS_WORD_SHARE = 0.5

# Unrelated scenes: what the base model must still draw whatever the LoRA learned.
UNRELATED_SCENES = [
    "a red sports car parked on a city street",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
    "a lighthouse on a rocky coast",
]
STYLE_SUBJECTS = [
    "a city street at night",
    "a portrait of an old man",
    "a bowl of fruit on a table",
    "a mountain landscape",
]


@dataclass(frozen=True)
class ClassWord:
    """The subject's class word and where it came from (None: a style LoRA)."""

    word: str | None
    source: str  # "data.class_word" | "captions" | "none in the captions"
    count: int = 0  # captions in which it follows the trigger
    total: int = 0  # captions that hold the trigger


def infer_class_word(captions: list[str], trigger: str) -> ClassWord:
    """The word after the trigger in most captions (articles skipped), when it is there in at
    least CLASS_WORD_SHARE of the captions holding the trigger."""
    trigger = trigger.lower()
    following: Counter[str] = Counter()
    holding = 0
    for caption in captions:
        words = re.findall(r"[a-z0-9\[\]_'-]+", caption.replace("[trigger]", trigger).lower())
        if trigger not in words:
            continue
        holding += 1
        rest = [w for w in words[words.index(trigger) + 1:] if w not in _ARTICLES]
        if rest and rest[0].isalpha() and len(rest[0]) > 1 and rest[0] not in _NOT_A_CLASS:
            following[rest[0]] += 1
    if following:
        word, count = following.most_common(1)[0]
        if count >= CLASS_WORD_SHARE * holding:
            return ClassWord(word, "captions", count, holding)
    return ClassWord(None, "none in the captions", 0, holding)


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def character_prompts(class_word: str) -> tuple[list[str], list[str]]:
    """(trigger prompts, prior prompts) of a character LoRA: 4 settings with the trigger; the
    same settings with the class word alone (the leak probe) and 4 unrelated scenes."""
    c = class_word
    trigger = [f"photo of [trigger] {c} in a cafe", f"close-up portrait photo of [trigger] {c}",
               f"full-body photo of [trigger] {c} standing in a park", f"a pencil drawing of [trigger] {c}"]
    prior = [f"photo of {_a(c)}", f"photo of {_a(c)} in a cafe", f"close-up portrait photo of {_a(c)}",
             f"full-body photo of {_a(c)} standing in a park", *UNRELATED_SCENES]
    return trigger, prior


def style_prompts() -> tuple[list[str], list[str]]:
    """(trigger prompts, prior prompts) of a style LoRA: scenes in the style, the same scenes and
    unrelated ones without it (a style that shows without its trigger has leaked)."""
    return [f"{s} in [trigger] style" for s in STYLE_SUBJECTS], [*STYLE_SUBJECTS, *UNRELATED_SCENES]


def read_captions(data) -> list[str] | None:
    """The captions of data.path as written (default caption for images without one); None when
    the folder cannot be listed (the data check says why, later)."""
    from klein_sweep.data.layout import CAPTION_EXTENSION, IMAGE_EXTENSIONS

    folder = Path(data.path).expanduser()
    if not data.path or not folder.is_dir():
        return None
    out = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")):
        caption = image.with_suffix(CAPTION_EXTENSION)
        try:
            text = caption.read_text(encoding="utf-8-sig").strip() if caption.is_file() else ""
        except (OSError, UnicodeDecodeError):
            text = ""  # the data check names the unreadable caption
        out.append(text or data.default_caption)
    return out


def class_word_of(data) -> ClassWord:
    if data.class_word:
        return ClassWord(data.class_word, "data.class_word")
    captions = read_captions(data)
    return infer_class_word(captions or [], data.trigger) if captions is not None else ClassWord(None, "no captions")


def resolve_prompts(eval_cfg, model, data):
    """EvalConfig with unset prompts filled for the model's world; the mini world's prompts on a
    real model are refused."""
    if model.kind != "pretrained":
        return dataclasses.replace(
            eval_cfg,
            trigger_prompts=list(mini.TRIGGER_PROMPTS) if eval_cfg.trigger_prompts is None else eval_cfg.trigger_prompts,
            prior_prompts=list(mini.PRIOR_PROMPTS) if eval_cfg.prior_prompts is None else eval_cfg.prior_prompts)
    for key, theirs in (("trigger_prompts", mini.TRIGGER_PROMPTS), ("prior_prompts", mini.PRIOR_PROMPTS)):
        mine = getattr(eval_cfg, key)
        if mine and set(mine) & set(theirs):
            raise ConfigError(f"eval.{key}", mine[0], f"prompts about your own subject: these are the mini world's ({model.name} "
                              "has never seen its creatures); leave eval.trigger_prompts and eval.prior_prompts unset to build "
                              "them from data.trigger and data.class_word, or write your own")
    if eval_cfg.trigger_prompts is not None and eval_cfg.prior_prompts is not None:
        return eval_cfg
    word = class_word_of(data)
    trigger, prior = character_prompts(word.word) if word.word else style_prompts()
    return dataclasses.replace(eval_cfg, trigger_prompts=eval_cfg.trigger_prompts or trigger,
                               prior_prompts=eval_cfg.prior_prompts or prior)


def prompt_note(settings) -> str | None:
    """The line a real model's sweep prints about where its prompts came from; None otherwise."""
    if settings.model.kind != "pretrained" or not settings.eval.enabled:
        return None
    word = class_word_of(settings.data)
    if word.source == "data.class_word":
        return f"evaluation prompts for a character: class word '{word.word}' (data.class_word)"
    if word.word:
        return (f"evaluation prompts for a character: class word '{word.word}' inferred from the captions "
                f"(it follows the trigger '{settings.data.trigger}' in {word.count} of {word.total}); set data.class_word to change it")
    return (f"evaluation prompts for a style: no class word follows the trigger '{settings.data.trigger}' in the captions; "
            "for a character set data.class_word (e.g. data.class_word=woman)")
