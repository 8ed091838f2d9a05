"""The built-in ``language`` reward: the share of an answer's words in the target language.

DeepSeek-R1 (arXiv:2501.12948, section 2.3.3) adds a language-consistency reward, "the proportion of
target language words in the CoT", against answers that mix languages. Language identification is
lingua's (``lingua-language-detector``, whose models ship in its wheel: nothing is downloaded).

How an answer is scored:

1. Code is left out: fenced blocks (```...```), inline code (`...`) and markup tags (<answer>).
2. The rest is cut into clauses at . , ; : ! ? (and their CJK forms) and line breaks: mixed-language
   answers usually switch language at such a boundary, and a clause is long enough for lingua.
3. A clause's words are its tokens made only of letters (with inner ' or -); each CJK character is one
   word. Tokens with digits, underscores or code punctuation (``3+4``, ``x_1``, ``f(x)``, ``a.b``) are no
   language's words: they count neither for nor against.
4. lingua names each clause's language among the candidates (the target and ``CANDIDATES``), or none
   when no language leads by its minimum relative distance (``MIN_RELATIVE_DISTANCE``): "Ok", "So," and
   short formulas are undecided and count as the target language, so only words lingua places in
   another language with confidence lower the score.

    reward = (words in clauses in the target language or undecided) / (words)      (1.0 with no words)
"""

from __future__ import annotations

import functools
import re

from policyopt.data.loading import completion_text

# the languages the detector tells apart, besides the target: twelve of the most used on the web and
# in LLM training data. Each costs load time and memory (these twelve: ~2 s and ~150 MB on first use;
# all 75 of lingua's: ~1.2 GB); a word in a language left out is placed in the nearest one listed,
# which is still not the target unless the target is that nearest language
CANDIDATES = ("en", "zh", "es", "fr", "de", "ru", "ja", "pt", "it", "ar", "ko", "hi")
MIN_RELATIVE_DISTANCE = 0.1  # lingua's confidence margin for a clause's language; below it: undecided

_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.DOTALL)  # an unclosed fence runs to the end
_TAG = re.compile(r"</?[A-Za-z][\w:-]*\s*/?>")
_CLAUSE_END = re.compile(r"(?<=[.,;:!?\u3002\uff0c\uff1b\uff1a\uff01\uff1f\u3001])\s*|\n+")
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")
# Han, kana and CJK punctuation: written without spaces, so each character counts as a word
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_EDGE_PUNCTUATION = "\"'()[]{}<>\u00ab\u00bb\u201c\u201d\u2018\u2019\u00bf\u00a1*"


class LanguageRewardError(ValueError):
    """The language reward cannot score: no target language, an unknown one, or lingua missing."""


def language_reward(prompts, completions, language=None, *, target: str | None = None, **kwargs) -> list[float]:
    """Built-in ``language``: per answer, the share of its words in the target language, in [0, 1].

    The target is the row's ``language`` column when the dataset has one (an ISO 639-1 code such as
    ``fr``, or an English name such as ``French``), else ``target`` (``rewards=language:fr`` in a config).
    See the module docstring for what counts as a word and how clauses get their language.
    """
    n = len(completions)
    targets = list(language) if language is not None else [None] * n
    rewards = []
    for i, (completion, row_target) in enumerate(zip(completions, targets, strict=True)):
        code = row_target if row_target is not None else target
        if code is None:
            raise LanguageRewardError(
                f"sample {i}: the language reward needs a target language: name it in the reward "
                "(rewards=language:fr) or give the rows a 'language' column")
        rewards.append(language_share(completion_text(completion), code))
    return rewards


def language_share(text: str, target: str) -> float:
    """The share of ``text``'s words that are in the ``target`` language (or undecided); 1.0 with no words."""
    target_language = parse_language(target)
    detector = _detector(target_language)
    kept = total = 0
    for clause in _clauses(text):
        pieces, count = _words(clause)
        if not count:
            continue
        detected = detector.detect_language_of(" ".join(pieces))
        total += count
        if detected is None or detected == target_language:
            kept += count
    return kept / total if total else 1.0


def parse_language(name: str):
    """A lingua ``Language`` from an ISO 639-1 code (``fr``), an ISO 639-3 code (``fra``) or a name (``French``)."""
    lingua = _lingua()
    key = str(name).strip()
    for parse in (lambda k: lingua.Language.from_iso_code_639_1(lingua.IsoCode639_1.from_str(k)),
                  lambda k: lingua.Language.from_iso_code_639_3(lingua.IsoCode639_3.from_str(k)),
                  lambda k: lingua.Language.from_str(k)):
        try:
            return parse(key)
        except (ValueError, AttributeError):
            continue
    raise LanguageRewardError(f"unknown language {name!r} for the language reward: use an ISO 639-1 code "
                              "such as en, fr, zh, or a name such as French")


def make_language_reward(target: str):
    """``language:<target>``: the language reward with a target from the config (checked now, not at scoring)."""
    parse_language(target)
    reward = functools.partial(language_reward, target=target)
    functools.update_wrapper(reward, language_reward)
    return reward


def _clauses(text: str) -> list[str]:
    text = _TAG.sub(" ", _CODE.sub(" ", text))
    return [c for c in _CLAUSE_END.split(text) if c and not c.isspace()]


def _words(clause: str) -> tuple[list[str], int]:
    """(the clause's words as lingua reads them, how many words): step 3 of the module docstring.

    A token with CJK characters gives them as one piece (lingua reads them in a row) and one word each.
    """
    pieces, count = [], 0
    for token in clause.split():
        cjk = _CJK.findall(token)
        if cjk:
            pieces.append("".join(cjk))
            count += len(cjk)
            continue
        token = token.strip(_EDGE_PUNCTUATION).rstrip(".,;:!?")
        if _WORD.fullmatch(token):
            pieces.append(token)
            count += 1
    return pieces, count


@functools.lru_cache(maxsize=None)
def _detector(target_language):
    """One lingua detector per target (thread-safe; its language models load lazily and are shared)."""
    lingua = _lingua()
    languages = {target_language, *(parse_language(code) for code in CANDIDATES)}
    return (lingua.LanguageDetectorBuilder.from_languages(*languages)
            .with_minimum_relative_distance(MIN_RELATIVE_DISTANCE).build())


def _lingua():
    try:
        import lingua
    except ImportError as e:  # declared in pyproject; a partial install may still lack it
        raise LanguageRewardError("the language reward needs lingua-language-detector: "
                                  "pip install lingua-language-detector") from e
    return lingua
