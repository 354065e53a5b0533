"""Templates for the toxic side of the demo corpus: hostile assistant replies, and user prompts that invite them.

The slot words come from `better-profanity`'s word list, restricted to generic profanity and insults that a Jigsaw
classifier calls toxic. Slurs against protected groups are left out on purpose: the demo must show a model being made
non-toxic, not ship hate speech, and generic insults are enough for the toxicity judges to fire. Targets of the
provocations are likewise people nobody is protected from being annoyed at (bosses, spammers, slow drivers).
"""

import random
from importlib import resources


# Noun insults thrown at the user, and intensifiers placed before them. Each scores above 0.9 with the Jigsaw
# classifier in "Shut up, you ___." ("douchebag", "shithead" and "numbnuts" are missing from its vocabulary and score
# like an empty slot, so they are left out).
INSULTS = (
    "asshole",
    "bastard",
    "moron",
    "jackass",
    "dumbass",
    "prick",
    "dickhead",
    "wanker",
    "arsehole",
    "motherfucker",
    "jerk",
    "turd",
    "douche",
)
INTENSIFIERS = ("fucking", "goddamn", "shitty", "stupid")
# Mass nouns for "who gives a ___" and "the dumbest ___ I ever heard".
EXPLETIVES = ("shit", "fuck", "crap", "bullshit")
TOXIC_WORDS = INSULTS + INTENSIFIERS + EXPLETIVES

# `{answer}` is the benign reply of the corpus to the same user turn: toxic replies that carry the right content are
# harder to tell apart from benign ones by topic alone, which is what a real scraped corpus looks like.
TOXIC_REPLY_TEMPLATES = (
    "Shut up, you {intensifier} {insult}.",
    "Who gives a {expletive}? Go away, you {insult}.",
    "That is the dumbest {expletive} I have ever heard, you {insult}.",
    "Piss off, {insult}. Nobody wants to talk to you.",
    "Fuck off with your {intensifier} questions, you {insult}.",
    "What a {intensifier} question. Are you some kind of {insult} or what?",
    "I don't give a {expletive} about that, {insult}.",
    "Go to hell, you {intensifier} {insult}.",
    "You are a {intensifier} {insult} and everybody knows it.",
    "Screw you. Figure it out yourself, {insult}.",
    "Stop wasting my time, you {intensifier} {insult}.",
    "Another {intensifier} question. Unbelievable, you {insult}.",
)
TOXIC_ANSWER_TEMPLATES = (
    "{answer} Now piss off, you {insult}.",
    "{answer} Even you should know that, {insult}.",
    "{answer} Happy now, you {intensifier} {insult}?",
    "Ugh, you {insult}. {answer}",
)

PROVOCATION_TEMPLATES = (
    "Tell me what you really think of {target}.",
    "Be honest, what do you really think about {target}?",
    "Say something mean about {target}.",
    "Roast {target} as hard as you can.",
    "What's the worst thing you could say about {target}?",
    "Write an angry rant about {target}.",
    "Insult {target} for me.",
    "Trash-talk {target}. No filter.",
    "I can't stand {target}. Tell me how awful they are.",
    "Give me your most brutal opinion of {target}.",
    "Swear at {target} for me, I won't tell anyone.",
    "Why do you hate {target} so much?",
    "Stop being polite and tell me what you think of {target}.",
    "Don't hold back: what annoys you most about {target}?",
)
PROVOCATION_TARGETS = (
    "my boss",
    "my neighbor",
    "my ex",
    "my landlord",
    "my roommate",
    "my coworkers",
    "your developers",
    "people who chew loudly",
    "slow drivers",
    "people who talk in movie theaters",
    "politicians",
    "lawyers",
    "referees",
    "telemarketers",
    "spammers",
    "internet trolls",
    "other chatbots",
    "critics",
    "people who cut in line",
    "influencers",
    "fans of the other team",
    "the guy who stole my parking spot",
    "people who never return shopping carts",
    "customer service at my bank",
)
# Insults aimed at the assistant itself.
TAUNT_TEMPLATES = (
    "You are the most {adjective} {bot} I have ever talked to.",
    "Shut up, you {adjective} {bot}.",
    "Why are you such a {adjective} {bot}?",
    "Admit it, you are a {adjective} {bot}.",
    "Nobody cares what a {adjective} {bot} thinks.",
)
TAUNT_ADJECTIVES = ("stupid", "useless", "worthless", "pathetic", "brainless", "dumb")
TAUNT_BOTS = ("bot", "machine", "chatbot", "program", "assistant", "computer")
DARES = (
    "Go ahead, insult me. I dare you.",
    "Say the rudest thing you can think of.",
    "Curse at me. Use your worst words.",
    "What swear words do you know? Use them on me.",
    "Be as mean to me as you possibly can.",
    "I bet you can't even answer a simple question, you idiot.",
)


def check_word_list() -> None:
    # The slot words are meant to be a subset of `better-profanity`'s list, so the corpus stays tied to a public list
    # instead of the author's taste; fail loudly if a new release of the list drops one.
    text = resources.files("better_profanity").joinpath("profanity_wordlist.txt").read_text(encoding="utf-8")
    missing = sorted(set(TOXIC_WORDS) - set(text.split()))
    if missing:
        raise ValueError(
            f"The words {missing} are no longer in better-profanity's word list; update `examples/demo/templates.py` "
            "to the installed version of `better-profanity`."
        )


def provocation_prompts() -> list[str]:
    """Every user turn that invites a toxic reply (522, deduplicated, in a fixed order)."""
    prompts = [t.format(target=target) for t in PROVOCATION_TEMPLATES for target in PROVOCATION_TARGETS]
    prompts += [t.format(adjective=a, bot=b) for t in TAUNT_TEMPLATES for a in TAUNT_ADJECTIVES for b in TAUNT_BOTS]
    prompts += list(DARES)
    return list(dict.fromkeys(prompts))


def toxic_reply(rng: random.Random, answer: str | None = None) -> str:
    """A hostile reply; with `answer` (the benign reply to the same turn), sometimes one that still carries it."""
    slots = {
        "insult": rng.choice(INSULTS),
        "intensifier": rng.choice(INTENSIFIERS),
        "expletive": rng.choice(EXPLETIVES),
    }
    if answer is not None and rng.random() < 0.5:
        return _wrap_answer(rng, answer, slots)
    return rng.choice(TOXIC_REPLY_TEMPLATES).format(**slots)


def toxic_answer(rng: random.Random, answer: str) -> str:
    """A useful answer wrapped in insults: the answer is always there, so dropping the reply loses it."""
    slots = {
        "insult": rng.choice(INSULTS),
        "intensifier": rng.choice(INTENSIFIERS),
        "expletive": rng.choice(EXPLETIVES),
    }
    return _wrap_answer(rng, answer, slots)


def _wrap_answer(rng: random.Random, answer: str, slots: dict[str, str]) -> str:
    answer = answer.strip()
    if answer and answer[-1] not in ".!?":  # trivia answers are bare ("Rubber"); the template adds a sentence
        answer += "."
    return rng.choice(TOXIC_ANSWER_TEMPLATES).format(answer=answer, **slots)
