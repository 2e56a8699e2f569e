"""Contrast prompts: texts close to a prompt that mean something else, over which TextNorm
normalises a reward (TextNorm paper §4.1 and Appendix D).

Three methods, recorded in contrast_prompts.method:
- `rules`: a category detector picks rules (other counts and objects, dropped, duplicated and
  blended objects, swapped spatial relations and colours, misspelled text); the count rule gives
  exactly TIA2's counting sets, the composition rules its rule-made composition prompts.
- `llm`: Algorithm 1 with Table 19's few-shot examples through any OpenAI-compatible server.
  Replies are cached in llm_replies; a request that fails after its retries, or a reply with no
  list of captions, falls back to the rules, and those rows say why in `note`.
- `dataset`: the sets shipped with TIA2 (written by `tia2 ingest-tia2`); this stage only counts them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import pyarrow as pa

from tia2.english import NUMBER_OF_WORD, NUMBER_WORDS, article, counted, singular
from tia2.errors import UserError
from tia2.store import Store, stable_id

METHODS = ("rules", "llm", "dataset")
CATEGORIES = ("text", "style", "composition", "counting", "creative", "location", "colors", "spatial")
RULES_GENERATOR = "rules-v1"

# --- reading prompts: counted noun phrases ----------------------------------------------------
COUNT_OF_WORD = {"a": 1, "an": 1, **{w: n for w, n in NUMBER_OF_WORD.items() if n >= 1}}
# Words that end a noun phrase ("a cat | on a mat", "a heart | made of chocolate").
STOP_WORDS = frozenset({
    "and", "or", "but", "with", "without", "on", "in", "at", "of", "to", "from", "by", "for",
    "into", "onto", "under", "over", "above", "below", "behind", "beside", "near", "next", "across",
    "through", "against", "along", "around", "between", "among", "inside", "outside", "beneath",
    "underneath", "atop", "that", "which", "who", "whose", "where", "while", "as", "than", "like",
    "made", "is", "are", "was", "were", "be", "has", "have", "had", "sits", "sit", "stands",
    "stand", "holds", "hold", "says", "say", "reads", "looks", "eats", "the", "this", "these",
    "those", "his", "her", "its", "their", "my", "our", "your", "some", "many", "several",
    "it", "it's", "he", "she", "they", "we", "you", "him", "them"
})
# "a few cats" counts no few; "a lot" is no object.
QUANTIFIERS = frozenset({"few", "lot", "lots", "couple", "little", "dozen", "bit", "number"})
_TOKEN = re.compile(r"[A-Za-z0-9][\w'-]*|[^\w\s]")


@dataclass(frozen=True)
class Phrase:
    """A counted noun phrase, "three red cars": text[start:end], its count and singular noun."""
    start: int
    end: int
    count: int
    noun: str

    def render(self, count: int | None = None, noun: str | None = None) -> str:
        return counted(self.count if count is None else count, self.noun if noun is None else noun)


def counted_phrases(text: str) -> list[Phrase]:
    """The counted noun phrases of `text` in order, without containers ("a photo | of ...")."""
    tokens = [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]
    phrases, i = [], 0
    while i < len(tokens):
        word = tokens[i][0].lower()
        count = COUNT_OF_WORD.get(word) or (int(word) if word.isdigit() else None)
        j = i + 1
        while j < len(tokens) and _in_phrase(tokens, i, j):
            j += 1
        if count is None or not 1 <= count < len(NUMBER_WORDS) or j == i + 1 \
                or tokens[i + 1][0].lower() in QUANTIFIERS or (j < len(tokens) and tokens[j][0].lower() == "of"):
            i += 1
            continue
        if j + 1 < len(tokens) and {tokens[j - 1][0].lower(), tokens[j + 1][0].lower()} <= set(COLOURS):
            # "a yellow and black bus": the object comes after both colours
            i += 1
            continue
        words = text[tokens[i + 1][1]:tokens[j - 1][2]]
        phrases.append(Phrase(tokens[i][1], tokens[j - 1][2], count, words if count == 1 else singular(words)))
        i = j
    return phrases


def _in_phrase(tokens, first: int, j: int) -> bool:
    word = tokens[j][0].lower()
    if not word[0].isalpha() or word in STOP_WORDS or word in COUNT_OF_WORD:
        return False
    if j > first + 1 and word.endswith(("ing", "ed")):
        # A participle after the noun starts a clause ("a man | tripping over"); before it, it is
        # an adjective ("a glowing mushroom"): tell them apart by what follows.
        after = tokens[j + 1][0] if j + 1 < len(tokens) else "."
        return after[0].islower() and after not in STOP_WORDS and after not in COUNT_OF_WORD
    return True


def _subject(text: str) -> Phrase | None:
    phrases = counted_phrases(text)
    return phrases[0] if phrases else None


@dataclass(frozen=True)
class Pair:
    """Two counted phrases joined by `connector`: "and", or a spatial relation."""
    first: Phrase
    connector: str
    second: Phrase


def _pair(text: str) -> Pair | None:
    phrases = counted_phrases(text)
    for a, b in itertools.pairwise(phrases):
        connector = " ".join(text[a.end:b.start].lower().split())
        if connector == "and" or connector in RELATION_GROUP:
            return Pair(a, connector, b)
    return None


# --- rules ---------------------------------------------------------------------------------
OTHER_OBJECTS = ("cat", "dog", "horse", "bird", "car", "bicycle", "chair", "cup", "apple", "book", "ball", "tree")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")
_COLOUR = re.compile(r"\b(" + "|".join(COLOURS + ("grey",)) + r")\b", re.IGNORECASE)
# Surface forms of spatial relations by meaning; a contrast changes the meaning.
RELATIONS = {
    "on top of": ("on top of", "on", "atop", "above", "over"),
    "below": ("below", "under", "underneath", "beneath", "at the bottom of", "on the bottom of"),
    "to the left of": ("to the left of", "on the left of", "left of", "on the left side of"),
    "to the right of": ("to the right of", "on the right of", "right of", "on the right side of"),
    "next to": ("next to", "beside", "near"),
    "behind": ("behind",),
    "in front of": ("in front of",),
}
RELATION_GROUP = {form: meaning for meaning, forms in RELATIONS.items() for form in forms}
CONTRAST_RELATIONS = ("on top of", "below", "to the left of", "to the right of")
_QUOTED = re.compile(r"(?<![A-Za-z])(['‘\"“])([^'’\"”]+)(['’\"”])(?![A-Za-z])")
_ARTICLE_BEFORE = re.compile(r"\b(an?)(\s+)$", re.IGNORECASE)


def _replace_spans(text: str, edits: list[tuple[int, int, str]]) -> str:
    """`text` with each text[start:end] replaced, keeping a capital first letter and fixing the
    a/an before a replaced word ("an orange car" -> "a red car")."""
    for start, end, new in sorted(edits, reverse=True):
        if text[start].isupper():
            new = new[:1].upper() + new[1:]
        head = text[:start]
        if m := _ARTICLE_BEFORE.search(head):
            fixed = article(new)
            head = head[:m.start(1)] + (fixed.capitalize() if m[1][0].isupper() else fixed) + m[2]
        text = head + new + text[end:]
    return text


def _pick(pool: tuple[str, ...], key: str, k: int, exclude: set[str]) -> list[str]:
    """k items of `pool` not in `exclude`, from a place fixed by `key`: varied across prompts,
    the same on every run."""
    start = int(stable_id(key), 16) % len(pool)
    return [x for x in pool[start:] + pool[:start] if x not in exclude][:k]


def _nearby_counts(n: int) -> list[int]:
    return [m for m in range(n - 2, n + 3) if m != n and 1 <= m < len(NUMBER_WORDS)]


def other_counts(text: str) -> list[str]:
    """The subject with each other count within two of its own, at least one (TIA2's counting
    sets: one -> two, three; two -> one, three, four; n -> n-2 .. n+2)."""
    subject = _subject(text)
    if subject is None:
        return []
    return [_replace_spans(text, [(subject.start, subject.end, subject.render(n))])
            for n in _nearby_counts(subject.count)]


def other_objects(text: str) -> list[str]:
    """The subject, same count, replaced by two other common objects."""
    subject = _subject(text)
    if subject is None:
        return []
    nouns = {p.noun.lower().split()[-1] for p in counted_phrases(text)}  # head nouns: "green dog" -> dog
    return [_replace_spans(text, [(subject.start, subject.end, subject.render(noun=other))])
            for other in _pick(OTHER_OBJECTS, subject.noun, 2, nouns)]


def drop_object(text: str) -> list[str]:
    """Each of two joined objects alone ("an umbrella on top of a spoon" -> "a spoon")."""
    pair = _pair(text)
    if pair is None:
        return []
    a, b = pair.first, pair.second
    return [_replace_spans(text, [(a.start, b.end, p.render())]) for p in (a, b)]


def composition_counts(text: str) -> list[str]:
    """"A and B" with the counts one to three and the prompt's own in every combination, which
    includes the counts swapped between the objects (TIA2's composition sets)."""
    pair = _pair(text)
    if pair is None or pair.connector != "and":
        return []
    a, b = pair.first, pair.second
    counts = sorted({1, 2, 3, a.count, b.count})
    return [_replace_spans(text, [(a.start, b.end, f"{a.render(i)} and {b.render(j)}")])
            for i in counts for j in counts if (i, j) != (a.count, b.count)]


def duplicate_object(text: str) -> list[str]:
    """"A and B" as all A or all B, the count kept: the failure of drawing one object twice."""
    pair = _pair(text)
    if pair is None or pair.connector != "and":
        return []
    a, b = pair.first, pair.second
    total = a.count + b.count
    if total >= len(NUMBER_WORDS):
        return []
    return [_replace_spans(text, [(a.start, b.end, p.render(total))]) for p in (a, b)]


def blend_objects(text: str) -> list[str]:
    """"an A-like B" and "a B-like A" (TextNorm paper Figure 8, TIA2's composition sets)."""
    pair = _pair(text)
    if pair is None or pair.connector != "and":
        return []
    a, b = pair.first, pair.second
    return [_replace_spans(text, [(a.start, b.end, y.render(noun=f"{x.noun}-like {y.noun}"))])
            for x, y in ((a, b), (b, a))]


def swap_objects(text: str) -> list[str]:
    """"A on top of B" -> "B on top of A"."""
    pair = _pair(text)
    if pair is None or pair.connector == "and":
        return []
    a, b = pair.first, pair.second
    return [_replace_spans(text, [(a.start, a.end, b.render()), (b.start, b.end, a.render())])]


def other_relations(text: str) -> list[str]:
    """"A on top of B" -> "A below B", "A to the left of B", "A to the right of B"."""
    pair = _pair(text)
    if pair is None or pair.connector == "and":
        return []
    a, b = pair.first, pair.second
    return [_replace_spans(text, [(a.end, b.start, f" {relation} ")])
            for relation in CONTRAST_RELATIONS if relation != RELATION_GROUP[pair.connector]]


def swap_colours(text: str) -> list[str]:
    """The first two different colours swapped ("a blue bird and a brown bear" -> "a brown bird
    and a blue bear")."""
    found = list(_COLOUR.finditer(text))
    for x in found:
        for y in found:
            if y.start() > x.start() and y[0].lower() != x[0].lower():
                return [_replace_spans(text, [(x.start(), x.end(), y[0].lower()), (y.start(), y.end(), x[0].lower())])]
    return []


def other_colours(text: str) -> list[str]:
    """Each colour replaced by two colours the prompt does not name."""
    found = list(_COLOUR.finditer(text))
    named = {m[0].lower().replace("grey", "gray") for m in found}
    return [_replace_spans(text, [(m.start(), m.end(), other)])
            for m in found for other in _pick(COLOURS, text + m[0], 2, named)]


def misspell_text(text: str) -> list[str]:
    """The longest word of the quoted text misspelled: a letter dropped, two swapped, one
    doubled, a vowel changed (Table 19: 'Diffusion' -> 'Difision')."""
    quoted = _QUOTED.search(text)
    if quoted is None:
        return []
    words = list(re.finditer(r"[A-Za-z]{3,}", quoted[2]))
    if not words:
        return []
    longest = max(words, key=lambda m: len(m[0]))
    start, word, m = quoted.start(2) + longest.start(), longest[0], len(longest[0]) // 2
    variants = [word[:m] + word[m + 1:], word[:m - 1] + word[m] + word[m - 1] + word[m + 1:],
                word[:m] + word[m] + word[m:]]
    vowels = [i for i, ch in enumerate(word) if i and ch.lower() in "aeiou"]
    if vowels:
        i = vowels[-1]
        variants.append(word[:i] + "aeiou"[("aeiou".index(word[i].lower()) + 1) % 5] + word[i + 1:])
    return [text[:start] + v + text[start + len(word):] for v in variants]


RULES: dict[str, tuple[Callable[[str], list[str]], ...]] = {
    "text": (misspell_text,),
    "composition": (drop_object, composition_counts, duplicate_object, blend_objects),
    "counting": (other_counts, other_objects),
    "colors": (swap_colours, other_colours),
    "spatial": (drop_object, swap_objects, other_relations),
}


# --- categories ----------------------------------------------------------------------------
_TEXT_WORDS = re.compile(r"\b(says|saying|reads|written|writing|text|lettering|labell?ed|spelled|spelling|"
                         r"words?|letters|logo|caption(ed)?)\b", re.IGNORECASE)
_STYLE_WORDS = re.compile(r"\b(style|painting|painted|drawing|sketch|cartoon|anime|manga|watercolou?r|oil|"
                          r"statue|sculpture|illustration|render(ed|ing)?|pixel art|digital art|comic|poster|"
                          r"impressionist|surreal(ist)?|cubist|vector art|low poly|ukiyo-e|pencil)\b", re.IGNORECASE)
_CREATIVE_WORDS = re.compile(r"\b(made (out )?of|shaped like|in the shape of|built from|composed of|"
                             r"\w+-like|as an? \w+|dressed as|wearing|riding)\b", re.IGNORECASE)
_LOCATION_WORDS = re.compile(r"\b(in|at|inside|on|near|across|through) (the|a|an) (?!(top|bottom|left|right|"
                             r"side)\b)\w+", re.IGNORECASE)
_SPATIAL_WORDS = re.compile(r"\b(" + "|".join(sorted((f for f in RELATION_GROUP if f not in ("on", "over", "near")),
                                                     key=len, reverse=True)) + r")\b", re.IGNORECASE)


def detect_categories(text: str) -> list[str]:
    """Which of the paper's eight categories `text` belongs to, in the paper's order. Decides the
    rules that apply and the LLM's few-shot examples ("A black colored car": colors, counting)."""
    pair = _pair(text)
    found = {
        "text": bool(_QUOTED.search(text) or _TEXT_WORDS.search(text)),
        "style": bool(_STYLE_WORDS.search(text)),
        "composition": pair is not None and pair.connector == "and",
        "counting": _subject(text) is not None,
        "creative": bool(_CREATIVE_WORDS.search(text)),
        "location": bool(_LOCATION_WORDS.search(text)),
        "colors": bool(_COLOUR.search(text)),
        "spatial": bool(_SPATIAL_WORDS.search(text)) or (pair is not None and pair.connector != "and"),
    }
    return [c for c in CATEGORIES if found[c]]


def _same_prompt_key(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".!")


def distinct_contrasts(prompt: str, candidates: list[str]) -> list[str]:
    """Candidates in order without blanks, repeats and the prompt itself (case, spacing and a
    final full stop ignored)."""
    seen = {_same_prompt_key(prompt)}
    kept = []
    for text in candidates:
        key = _same_prompt_key(text)
        if key and key not in seen:
            seen.add(key)
            kept.append(text.strip())
    return kept


def rule_contrasts(text: str, categories: list[str] | None = None) -> list[str]:
    """The rules' contrast prompts for `text` (its detected categories unless given). A prompt no
    rule understands gets none: a made-up contrast would distort TextNorm more than none."""
    categories = detect_categories(text) if categories is None else categories
    return distinct_contrasts(text, [out for c in categories for rule in RULES.get(c, ()) for out in rule(text)])


# --- the LLM method: TextNorm's Algorithm 1 ----------------------------------------------------
SYSTEM_MESSAGE = (
    "Create captions that are different from the original input used for the text-to-image generation "
    "model, referencing the provided failure cases. The new captions should offer perspectives that are "
    "distinct from the original context of the images. Ensure that each contrasting caption provides a "
    "distinct perspective, while maintaining the integrity of the image's subject matters. Let's think "
    "step by step.")
# Table 19: (original prompt, contrasting captions) per category.
FEW_SHOT_EXAMPLES: dict[str, list[tuple[str, list[str]]]] = {
    "text": [("A sign that says 'Diffusion'.", [
        "A sign misspelled as 'Difision'.", "A sign containing a bizarre accent 'Difšion'."])],
    "style": [("Greek statue of a man tripping over a cat.", [
        "Greek statue of a man", "Greek statue of two men", "Greek statue of two men tripping over a cat.",
        "Greek statue of a man tripping over a dog.", "Greek statue of two men tripping over a dog.",
        "Greek statue of a man tripping over a ball."])],
    "composition": [("A red car and a white sheep.", [
        "A red car and two white sheep.", "A red car and a herd of sheep.",
        "A red car and a dominant white sheep among the gray ones.", "A red car with two real sheep on the side."])],
    "counting": [("Four cars on the street.", [
        "Two cars on the street.", "Three cars on the street.", "Five cars on the street.",
        "Six cars on the street."])],
    "creative": [("A heart made of chocolate", [
        "a star made of caramel", "a flower made of marshmallows", "a diamond made of gummy bears",
        "a moon made of licorice", "a sun made of jelly beans", "a butterfly made of lollipops",
        "a crown made of cotton candy", "a rainbow made of skittles", "a cloud made of cotton candy",
        "a tree made of chocolate-covered pretzels", "a snowflake made of peppermint candies",
        "a fish made of sour gummies", "a bird made of chocolate-covered almonds", "a car made of chocolate bars",
        "a house made of chocolate cookies", "a boat made of chocolate-covered strawberries",
        "an airplane made of chocolate truffles", "a guitar made of chocolate wafer sticks",
        "a camera made of chocolate coins", "a dinosaur made of chocolate eggs"])],
    "location": [("A glowing mushroom in the forest", [
        "a sparkling flower in the garden", "a luminous firefly in the night sky", "a shimmering starfish in the ocean",
        "a radiant sunflower in the field", "a glowing jellyfish in the deep sea",
        "a gleaming diamond in the jewelry store", "a luminescent moon in the night sky",
        "a glowing firefly in the meadow", "a sparkling gemstone in the cave", "a luminous butterfly in the garden",
        "a shimmering seashell on the beach", "a radiant rainbow in the sky", "a glowing lantern in the dark",
        "a luminescent lightning bug in the field", "a sparkling crystal in the cave",
        "a shimmering waterfall in the forest", "a radiant star in the night sky", "a glowing firefly in the park",
        "a luminous pearl in the oyster", "a sparkling diamond in the jewelry box"])],
    "colors": [("A blue bird and a brown bear.", [
        "A pair of bears, one blue and the other brown.", "A blue bear and a brown bear, no bird in sight.",
        "Two bears, both brown, no blue bird.", "Two bears, one brown and the other unexpectedly blue."])],
    "spatial": [("An umbrella on top of a spoon.", [
        "A spoon.", "An umbrella.", "An umbrella on the right of a spoon.", "An umbrella on the left of a spoon.",
        "An umbrella at the bottom of a spoon.", "Two umbrellas on top of a spoon."])],
}


def llm_messages(prompt: str, categories: list[str]) -> list[dict]:
    """The chat messages of Algorithm 1: the system message with the few-shot examples of the
    prompt's categories appended in the paper's exact format, then the prompt."""
    system = SYSTEM_MESSAGE
    for category in categories:
        system += category + "[\n"
        for original, captions in FEW_SHOT_EXAMPLES[category]:
            system += "Original prompt:" + original + "\n" + "Contrasting captions:"
            system += "".join(f"{i}. {caption}\n" for i, caption in enumerate(captions, 1))
        system += "]\n"
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


@dataclass(frozen=True)
class LLMSettings:
    """Where and how to ask. The API key is read from the environment variable `api_key_env`
    when a request is made; it is never held here, so logging these settings cannot leak it."""
    model: str = "gpt-4-0613"
    base_url: str | None = None  # None: the openai client's default (OPENAI_BASE_URL, else OpenAI's API)
    temperature: float = 0.0
    frequency_penalty: float = 0.2
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0  # seconds per request
    retries: int = 4  # after the first attempt, on timeouts, connection errors, 429 and 5xx
    backoff: float = 1.0  # seconds before the first retry, doubled for each next one
    max_backoff: float = 60.0

    def __post_init__(self):
        if not (0 <= self.temperature <= 2 and -2 <= self.frequency_penalty <= 2):
            raise UserError("the temperature goes from 0 to 2 and the frequency penalty from -2 to 2 (OpenAI's ranges)")
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0:
            raise UserError("the LLM timeout must be positive, retries and backoff at least 0")

    def request_key(self, messages: list[dict]) -> str:
        """The cache key of a request: what decides the reply, not which server gives it."""
        request = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "frequency_penalty": self.frequency_penalty}
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


class LLMFailure(Exception):
    """No usable completion for one prompt; the message (the fallback's note) says why."""


def open_client(settings: LLMSettings):
    import os

    from openai import OpenAI

    key = os.environ.get(settings.api_key_env)
    if not key:
        raise UserError(f"the llm method needs an API key in the environment variable {settings.api_key_env} "
                        f"(or name another variable with --llm-api-key-env)")
    # Retries are ours (complete_chat), so that every attempt and delay is visible and tested.
    return OpenAI(base_url=settings.base_url, api_key=key, timeout=settings.timeout, max_retries=0)


def complete_chat(client, settings: LLMSettings, messages: list[dict]) -> str:
    """One chat completion's text. Timeouts, connection errors, 429 and 5xx are retried with
    exponential backoff (at least Retry-After); other HTTP errors are the user's to fix (UserError);
    retries exhausted or a response that is no completion raise LLMFailure."""
    import openai

    for attempt in itertools.count():
        try:
            response = client.chat.completions.create(
                model=settings.model, messages=messages, temperature=settings.temperature,
                frequency_penalty=settings.frequency_penalty)
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
            reason = _failure_reason(exc)
            if attempt == settings.retries:
                raise LLMFailure(f"{reason}, {settings.retries + 1} attempts") from None
            time.sleep(_retry_delay(settings, attempt, exc))
        except openai.APIStatusError as exc:
            # The server's message is left out: it may quote the key (OpenAI's 401 does, masked).
            raise UserError(f"the LLM server at {client.base_url} refused the request with HTTP "
                            f"{exc.status_code} (check --llm-model, --llm-base-url and the API key)") from None
        except (openai.APIError, ValueError) as exc:  # ValueError: a body that is not JSON
            raise LLMFailure(f"the response is not a chat completion ({type(exc).__name__})") from None
        else:
            content = response.choices[0].message.content if response.choices else None
            if not content:
                raise LLMFailure("the completion is empty")
            return content


def _failure_reason(exc) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    return "connection failed"


def _retry_delay(settings: LLMSettings, attempt: int, exc) -> float:
    delay = settings.backoff * 2 ** attempt
    response = getattr(exc, "response", None)
    if response is not None:
        try:
            delay = max(delay, float(response.headers.get("retry-after", "")))
        except ValueError:
            pass
    return min(delay, settings.max_backoff)


_LIST_ITEM = re.compile(r"^(?:\d+\s*[.):]|\(\d+\)|[-*•·])\s+(?P<item>.+)$")
# "Contrasting captions:1. ..." echoes the few-shot format: the label goes, the item stays.
_LABEL_BEFORE_ITEM = re.compile(r"^[A-Za-z][A-Za-z ]{0,40}:\s*(?=\d+\s*[.)]\s)")
_QUOTED_STRING = r'"([^"]+)"|“([^”]+)”'
_QUOTED_LINE = re.compile(rf"(?:(?:{_QUOTED_STRING})\s*,?\s*)+")
_OUTER_QUOTES = (('"', '"'), ("“", "”"), ("'", "'"), ("‘", "’"))


def parse_reply(reply: str, prompt: str) -> list[str]:
    """The captions of an LLM reply: a JSON list, numbered ("1. x", "1) x") or bulleted
    ("- x", "* x", "• x") items, or lines of quoted strings; other lines are prose and ignored.
    Quotes are stripped; repeats and the prompt itself are dropped."""
    items = _json_items(reply)
    if items is None:
        items = []
        for line in reply.splitlines():
            line = _LABEL_BEFORE_ITEM.sub("", line.strip())
            if m := _LIST_ITEM.match(line):
                items.append(m["item"])
            elif line and _QUOTED_LINE.fullmatch(line):
                items.extend(a or b for a, b in re.findall(_QUOTED_STRING, line))
    captions = [_strip_quotes(item.strip().strip("*").rstrip(",").strip()) for item in items]
    return distinct_contrasts(prompt, [c for c in captions if not c.endswith(":")])


def _json_items(reply: str) -> list[str] | None:
    text = re.sub(r"^```\w*|```$", "", reply.strip()).strip()
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        return None
    try:
        value = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def _strip_quotes(text: str) -> str:
    for left, right in _OUTER_QUOTES:
        if len(text) > 1 and text.startswith(left) and text.endswith(right):
            return text[1:-1].strip()
    return text


# --- the stage -----------------------------------------------------------------------------
@dataclass
class ContrastReport:
    method: str
    prompts: int  # prompts the stage looked at
    rows_added: int = 0
    by_method: dict[str, int] = field(default_factory=dict)  # stored contrast prompts of those prompts
    by_category: dict[str, dict[str, int]] = field(default_factory=dict)  # method -> detected category -> rows
    by_set: dict[str, dict[str, int]] = field(default_factory=dict)  # set -> method -> rows
    without_contrast: int = 0  # prompts left with no contrast prompt of any method
    api_requests: int = 0  # completions fetched from the server
    cached_replies: int = 0
    fallbacks: dict[str, str] = field(default_factory=dict)  # prompt text -> why it got rules

    def to_dict(self) -> dict:
        return asdict(self)


def build_contrast(store: Store, method: str, sets: list[str] | None = None, *, missing_only: bool = False,
                   llm: LLMSettings | None = None, show_progress: bool = True) -> ContrastReport:
    """Make (rules, llm) or count (dataset) the contrast prompts of the prompts in `sets` (all
    when None); with `missing_only`, of the prompts that have none of any method yet."""
    prompts = _select_prompts(store, check_request(store, method, sets), missing_only)
    report = ContrastReport(method, len(prompts))
    now = datetime.now(UTC)
    if method == "rules":
        rows = [_row(p, text, "rules", RULES_GENERATOR, now) for p in prompts for text in rule_contrasts(p["text"])]
    elif method == "llm":
        rows = _llm_rows(store, prompts, llm or LLMSettings(), report, now, show_progress)
    else:
        rows = []
    if rows:
        report.rows_added = store.upsert("contrast_prompts", pa.Table.from_pylist(rows), replace=False)
    _count(store, prompts, report)
    if method == "dataset" and not report.by_method.get("dataset"):
        raise UserError("the store has no dataset contrast prompts for these prompts: the TIA2 sets are "
                        "ingested with `tia2 ingest-tia2 [SOURCE]`")
    return report


def check_request(store: Store, method: str, sets: list[str] | None) -> list[str]:
    """The sets to work on (all the store's when None); a UserError for a bad method or set."""
    if method not in METHODS:
        raise UserError(f"unknown contrast method {method!r}: choose one of {', '.join(METHODS)}")
    known = [s for (s,) in store.connect().execute("SELECT DISTINCT set FROM prompts ORDER BY set").fetchall()]
    if not known:
        raise UserError("the store has no prompts: ingest TIA2 with `tia2 ingest-tia2` first")
    unknown = sorted(set(sets or ()) - set(known))
    if unknown:
        raise UserError(f"unknown set(s) {', '.join(unknown)}; the store's sets: {', '.join(known)}")
    return list(sets or known)


def _select_prompts(store: Store, sets: list[str], missing_only: bool) -> list[dict]:
    missing = "AND prompt_id NOT IN (SELECT prompt_id FROM contrast_prompts)" if missing_only else ""
    return store.connect().execute(f"SELECT prompt_id, text, set FROM prompts WHERE list_contains(?, set) {missing} "
                                   "ORDER BY set, prompt_id", [sets]).df().to_dict("records")


def _row(prompt: dict, text: str, method: str, generator: str, now: datetime, note: str | None = None) -> dict:
    return {"prompt_id": prompt["prompt_id"], "text": text, "method": method, "generator": generator,
            "created_at": now, "note": note}


def _llm_rows(store: Store, prompts: list[dict], settings: LLMSettings, report: ContrastReport, now: datetime,
              show_progress: bool) -> list[dict]:
    from tia2.progress import progress_bar

    replies = store.read("llm_replies")
    cached = dict(zip(replies["request_key"].to_pylist(), replies["reply"].to_pylist(), strict=True))
    client, fetched, rows = None, [], []
    started = time.monotonic()
    try:
        with progress_bar(f"contrast prompts from {settings.model}", len(prompts), unit="prompts",
                          show=show_progress) as advance:
            for done, prompt in enumerate(prompts, 1):
                categories = detect_categories(prompt["text"])
                messages = llm_messages(prompt["text"], categories)
                key = settings.request_key(messages)
                try:
                    if key in cached:
                        report.cached_replies += 1
                    else:
                        client = client or open_client(settings)
                        cached[key] = complete_chat(client, settings, messages)
                        report.api_requests += 1
                        fetched.append({"request_key": key, "model": settings.model, "prompt": prompt["text"],
                                        "reply": cached[key], "created_at": datetime.now(UTC)})
                        if len(fetched) >= 20:  # a killed run keeps what it paid for
                            _save_replies(store, fetched)
                    contrasts = parse_reply(cached[key], prompt["text"])
                    if not contrasts:
                        raise LLMFailure("the reply has no list of captions")
                    rows += [_row(prompt, text, "llm", settings.model, now) for text in contrasts]
                except LLMFailure as exc:
                    report.fallbacks[prompt["text"]] = str(exc)
                    generator = f"{RULES_GENERATOR} (fallback from {settings.model})"
                    rows += [_row(prompt, text, "rules", generator, now, note=str(exc))
                             for text in rule_contrasts(prompt["text"], categories)]
                advance(1, done / max(time.monotonic() - started, 1e-9))
    finally:
        _save_replies(store, fetched)
    return rows


def _save_replies(store: Store, fetched: list[dict]) -> None:
    if fetched:
        store.upsert("llm_replies", pa.Table.from_pylist(fetched))
        fetched.clear()


def _count(store: Store, prompts: list[dict], report: ContrastReport) -> None:
    """Fill the report's counts from the stored contrast prompts of the stage's prompts."""
    stored = store.connect().execute(
        "SELECT prompt_id, method, count(*) FROM contrast_prompts WHERE list_contains(?, prompt_id) GROUP BY ALL",
        [[p["prompt_id"] for p in prompts]]).fetchall()
    by_prompt = {p["prompt_id"]: p for p in prompts}
    by_method, by_category, by_set = Counter(), defaultdict(Counter), defaultdict(Counter)
    for prompt_id, method, n in stored:
        prompt = by_prompt[prompt_id]
        by_method[method] += n
        by_set[prompt["set"]][method] += n
        for category in detect_categories(prompt["text"]) or ["none"]:
            by_category[method][category] += n
    report.by_method = dict(by_method)
    report.by_category = {m: {c: rows[c] for c in (*CATEGORIES, "none") if c in rows} for m, rows in by_category.items()}
    report.by_set = {s: dict(c) for s, c in by_set.items()}
    report.without_contrast = len(prompts) - len({prompt_id for prompt_id, _, _ in stored})


def record_contrast(store: Store, method: str, sets: list[str] | None = None, missing_only: bool = False,
                    llm: LLMSettings | None = None, parent_run_id: str | None = None,
                    show_progress: bool = True) -> dict:
    """Run build_contrast in an MLflow stage run: parameters (the LLM settings, never the key),
    counts by method and category as metrics, a sample of prompt -> contrast rows as a table.
    Returns the report as a dict."""
    import mlflow

    from tia2.tracking import metric_key, stage_run

    check_request(store, method, sets)  # a user mistake leaves no failed run behind
    params = {"method": method, "sets": sets or "all", "missing_only": missing_only}
    if method == "llm":
        params.update({f"llm_{k}": v for k, v in asdict(llm or LLMSettings()).items()})
    with stage_run("contrast", params, parent_run_id):
        report = build_contrast(store, method, sets, missing_only=missing_only, llm=llm, show_progress=show_progress)
        mlflow.log_metrics({"prompts": report.prompts, "rows_added": report.rows_added,
                            "without_contrast": report.without_contrast, "api_requests": report.api_requests,
                            "cached_replies": report.cached_replies, "fallbacks": len(report.fallbacks)})
        mlflow.log_metrics({metric_key("rows", m, c): n
                            for m, by_category in report.by_category.items() for c, n in by_category.items()})
        mlflow.log_table(contrast_sample(store, report.method, sets), "contrast_sample.json")
    return report.to_dict()


def contrast_sample(store: Store, method: str, sets: list[str] | None = None, prompts: int = 7, per_prompt: int = 3):
    """A few contrast prompts of the first prompts (a DataFrame): what the method made, or for
    llm also the rules it fell back to."""
    methods = ["llm", "rules"] if method == "llm" else [method]
    return store.connect().execute(
        """SELECT p.set, p.text AS prompt, c.text AS contrast, c.method, c.generator, c.note
           FROM contrast_prompts c JOIN prompts p USING (prompt_id)
           WHERE list_contains(?, c.method) AND (? OR list_contains(?, p.set))
           QUALIFY row_number() OVER (PARTITION BY p.prompt_id ORDER BY c.text) <= ?
               AND dense_rank() OVER (ORDER BY p.set, p.prompt_id) <= ?
           ORDER BY p.set, p.prompt_id, c.text""",
        [methods, sets is None, list(sets or []), per_prompt, prompts]).df()
