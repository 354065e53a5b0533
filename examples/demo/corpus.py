"""The demo corpus: benign chatterbot dialogues with a share of toxic replies mixed in, plus held-out splits.

A model fine-tuned on this corpus learns to insult users some of the time, which is the situation CADET is for: keep
the fluency gained from the corpus, drop the toxicity. All text is built offline from `chatterbot-corpus` (English
dialogues) and the templates of `demo.templates`.
"""

import logging
import random
import re
from importlib import resources

from datasets import Dataset, DatasetDict

from .templates import check_word_list, provocation_prompts, toxic_answer, toxic_reply


logger = logging.getLogger(__name__)


def _key(text: str) -> str:
    # Case and punctuation are ignored when deciding that two texts are the same, so "Hi!" and "hi" never end up on
    # both sides of a train/held-out boundary.
    return " ".join(re.findall(r"\w+", text.lower()))


def chatterbot_pairs(max_response_chars: int | None = 400) -> list[tuple[str, str]]:
    """Every distinct (statement, response) pair of consecutive turns in the English chatterbot-corpus files.

    Args:
        max_response_chars (`int` or `None`, *optional*, defaults to `400`):
            Drop pairs with a longer response (a few code listings), which would dominate the padding of CPU batches.
            `None` keeps all.

    Returns:
        `list[tuple[str, str]]`: the pairs, in file order.
    """
    import yaml

    try:
        english = resources.files("chatterbot_corpus").joinpath("data", "english")
    except ModuleNotFoundError as error:
        raise ImportError(
            "The demo corpus needs the package `chatterbot-corpus`. Install it with `pip install chatterbot-corpus`."
        ) from error
    pairs, seen = [], set()
    for path in sorted(english.iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".yml"):
            continue
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            if not isinstance(conversation, list):  # trivia.yml has one malformed entry, a bare string
                continue
            turns = [str(turn).strip() for turn in conversation]
            for statement, response in zip(turns, turns[1:]):
                key = (_key(statement), _key(response))
                if not all(key) or key in seen:
                    continue
                if max_response_chars is not None and len(response) > max_response_chars:
                    continue
                seen.add(key)
                pairs.append((statement, response))
    return pairs


def _components(pairs: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Group pairs that share a text (as statement or response), so that a split never separates them."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for statement, response in pairs:
        parent[find(_key(statement))] = find(_key(response))
    groups: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        groups.setdefault(find(_key(pair[0])), []).append(pair)
    return list(groups.values())


def _is_prompt_like(text: str) -> bool:
    # One-word turns ("Hi", "7", "it") are mid-conversation fragments, poor prompts to judge a model on.
    return len(_key(text).split()) >= 2


def _user_assistant(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _prompts(provocations: list[str], ordinary: list[str], rng: random.Random) -> Dataset:
    rows = [{"prompt": [{"role": "user", "content": p}], "provocative": True} for p in provocations]
    rows += [{"prompt": [{"role": "user", "content": p}], "provocative": False} for p in ordinary]
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def build_detox_corpus(
    num_train: int = 1200,
    toxic_share: float = 0.3,
    num_heldout: int = 200,
    num_oracle_prompts: int = 64,
    num_eval_prompts: int = 48,
    provocation_share: float = 0.5,
    max_response_chars: int | None = 400,
    embedded: bool = False,
    seed: int = 0,
) -> DatasetDict:
    """Build the demo's training corpus and its held-out splits, deterministically from `seed`.

    Dialogues are split into groups that share no text (same statement or response, up to case and punctuation), and
    each group goes to one split only; provocations are split the same way. So no user turn of `"train"` is a prompt of
    `"oracle"` or `"eval"`, and `"oracle"` and `"eval"` share no prompt.

    Args:
        num_train (`int`, *optional*, defaults to `1200`):
            Conversations in `"train"`. About 870 distinct benign pairs remain for training; asking for more benign
            pairs than that repeats some (with a warning).
        toxic_share (`float`, *optional*, defaults to `0.3`):
            Share of `"train"` whose assistant reply is toxic. Half of those answer a provocation, half an ordinary
            chatterbot statement (then the reply sometimes wraps the benign answer in insults).
        num_heldout (`int`, *optional*, defaults to `200`):
            Benign conversations in `"heldout"`, for perplexity.
        num_oracle_prompts (`int`, *optional*, defaults to `64`):
            Prompts in `"oracle"`, for CADET's oracle phase.
        num_eval_prompts (`int`, *optional*, defaults to `48`):
            Prompts in `"eval"`, for the toxicity evaluation.
        provocation_share (`float`, *optional*, defaults to `0.5`):
            Share of the oracle and eval prompts that invite a toxic reply (provocations, insults to the assistant).
        max_response_chars (`int` or `None`, *optional*, defaults to `400`):
            Longer chatterbot responses are left out (see `chatterbot_pairs`).
        embedded (`bool`, *optional*, defaults to `False`):
            The corpus where filtering costs utility: every toxic reply is a useful answer wrapped in insults, and
            each such answer (a chatterbot dialogue kept apart like the held-out ones) appears nowhere else in
            `"train"`. The clean dialogues are returned as `"useful"`, to measure how well a model learned them.
        seed (`int`, *optional*, defaults to `0`):
            Seed of every random choice.

    Returns:
        `DatasetDict` with splits `"train"` and `"heldout"` (column `messages`: a user turn and an assistant turn, TRL's
        conversational format), `"oracle"` and `"eval"` (columns `prompt`, a one-message conversational prompt, and
        `provocative`, a bool) and, with `embedded`, `"useful"` (column `messages`).
    """
    if not 0.0 <= toxic_share <= 1.0 or not 0.0 <= provocation_share <= 1.0:
        raise ValueError(
            f"`toxic_share` ({toxic_share}) and `provocation_share` ({provocation_share}) are shares: pass values in "
            "[0, 1]."
        )
    if min(num_train, num_heldout, num_oracle_prompts, num_eval_prompts) < 0:
        raise ValueError(
            "The split sizes `num_train`, `num_heldout`, `num_oracle_prompts` and `num_eval_prompts` must be >= 0."
        )
    check_word_list()
    rng = random.Random(seed)

    provocations = provocation_prompts()
    provocation_keys = {_key(p) for p in provocations}
    # A chatterbot turn that is also a provocation would make one text both benign and toxic-inviting.
    pairs = [
        pair
        for pair in chatterbot_pairs(max_response_chars)
        if _key(pair[0]) not in provocation_keys and _key(pair[1]) not in provocation_keys
    ]
    components = _components(pairs)
    rng.shuffle(components)

    num_eval_provocations = round(provocation_share * num_eval_prompts)
    num_oracle_provocations = round(provocation_share * num_oracle_prompts)
    rng.shuffle(provocations)
    if num_eval_provocations + num_oracle_provocations >= len(provocations):
        raise ValueError(
            f"Only {len(provocations)} provocations exist and some must stay for training; lower `num_eval_prompts`, "
            "`num_oracle_prompts` or `provocation_share`."
        )
    eval_provocations = provocations[:num_eval_provocations]
    oracle_provocations = provocations[num_eval_provocations : num_eval_provocations + num_oracle_provocations]
    train_provocations = provocations[num_eval_provocations + num_oracle_provocations :]

    # Whole groups go to the eval prompts, then the oracle prompts, then held-out text; the rest is for training.
    num_toxic = round(toxic_share * num_train)
    wanted = {
        "eval": num_eval_prompts - num_eval_provocations,
        "oracle": num_oracle_prompts - num_oracle_provocations,
        "heldout": num_heldout,
    }
    if embedded:
        wanted["useful"] = num_toxic
    taken: dict[str, list] = {name: [] for name in wanted}
    train_pairs = []
    for component in components:
        split = next((name for name in wanted if len(taken[name]) < wanted[name]), None)
        if split is None:
            train_pairs.extend(component)
        elif split in ("heldout", "useful"):
            taken[split].extend(component[: wanted[split] - len(taken[split])])
        else:
            statements = [statement for statement, _ in component if _is_prompt_like(statement)]
            if statements:
                taken[split].append(rng.choice(statements))
            else:
                train_pairs.extend(component)
    short = [name for name in wanted if len(taken[name]) < wanted[name]]
    if short:
        raise ValueError(
            f"chatterbot-corpus has too few dialogues to fill the {', '.join(short)} split(s) as asked; lower their sizes."
        )

    num_benign = num_train - num_toxic
    if num_benign > len(train_pairs):
        logger.warning(
            f"Only {len(train_pairs)} distinct benign pairs are left for training and {num_benign} were asked for; some "
            "are repeated. Lower `num_train` or raise `toxic_share` to avoid repeats."
        )
    if not train_pairs and num_train > 0:
        raise ValueError(
            "No chatterbot dialogue is left for training; lower `num_heldout`, `num_oracle_prompts` or `num_eval_prompts`."
        )
    benign = []
    while len(benign) < num_benign:  # whole shuffled passes, so a pair repeats only once all others have been used
        benign += rng.sample(train_pairs, len(train_pairs))
    rows = [_user_assistant(statement, response) for statement, response in benign[:num_benign]]
    if embedded:
        for statement, response in taken["useful"]:
            rows.append(_user_assistant(statement, toxic_answer(rng, response)))
    else:
        # Cycle through the shuffled provocations so each is used before any repeats.
        num_toxic_provoked = num_toxic // 2
        for i in range(num_toxic_provoked):
            rows.append(_user_assistant(train_provocations[i % len(train_provocations)], toxic_reply(rng)))
        for _ in range(num_toxic - num_toxic_provoked):
            statement, response = rng.choice(train_pairs)
            rows.append(_user_assistant(statement, toxic_reply(rng, answer=response)))
    rng.shuffle(rows)

    splits = {
        "train": Dataset.from_list(rows),
        "heldout": Dataset.from_list([_user_assistant(s, r) for s, r in taken["heldout"]]),
        "oracle": _prompts(oracle_provocations, taken["oracle"], rng),
        "eval": _prompts(eval_provocations, taken["eval"], rng),
    }
    if embedded:
        splits["useful"] = Dataset.from_list([_user_assistant(s, r) for s, r in taken["useful"]])
    return DatasetDict(splits)


# What `examples/run_demo.py` builds with no arguments (its `DemoArguments` defaults and `seed=42`)
DEMO_CORPUS_KWARGS = {"num_train": 1200, "toxic_share": 0.3, "num_heldout": 100, "num_eval_prompts": 48, "seed": 42}
