"""Where a model's held-out perplexity moved: the held-out conversations' token NLL under saved models, by kind of token.

`quality.py --save_models` keeps each row's trained model; this script scores the held-out conversations of the same
set-up (`perplexity` in quality.py's table) token by token under each, and prints, per kind of token, its count, its
mean NLL under each model and its share of the change from the first model (the sum over its tokens of the NLL
difference; the shares add up to the change of the whole text's log-perplexity times its token count):

- `reply first`: the first token of an assistant reply;
- `reply`: the other tokens of the reply, its end-of-turn token excluded;
- `reply end`: the reply's end-of-turn token (where the model stops);
- `other`: the chat headers, the system prompt and the user turns.

Then the tokens whose summed NLL rose most, and fell most, from the first model to the last.

    python benchmarks/heldout_tokens.py --output_dir outputs/t --models sft=outputs/t/runs/steps-sft/model,cadet=...
    python benchmarks/heldout_tokens.py --models base=base,... --corpus embedded   # any option of quality.py's set-up

A model is `name=folder` (a saved model or adapter; `base` for the untrained model). `--output_dir` matters for
`--model tiny` only: the tiny model lives there (give quality.py's).
"""

import argparse
import collections
import math
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

KINDS = ("reply first", "reply", "reply end", "other")


def token_kinds(input_ids, markers) -> list[str]:
    """The kind of each predicted token (`input_ids[1:]`)."""
    import torch

    from trl_cadet.data_utils import assistant_token_mask

    ids = torch.tensor([input_ids])
    reply = assistant_token_mask(ids, markers)[0].tolist()
    kinds = []
    for t in range(1, len(input_ids)):
        if not reply[t]:
            kinds.append("other")
        elif not reply[t - 1]:
            kinds.append("reply first")
        elif input_ids[t] == markers.end:
            kinds.append("reply end")
        else:
            kinds.append("reply")
    return kinds


def load(setup, folder: str):
    from peft import PeftModel
    from quality_rows import load_model
    from transformers import AutoModelForCausalLM

    if folder == "base":
        return load_model(setup)
    if os.path.exists(os.path.join(folder, "adapter_config.json")):
        return PeftModel.from_pretrained(load_model(setup), folder)
    return AutoModelForCausalLM.from_pretrained(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--model` is quality.py's
    )
    parser.add_argument("--models", required=True, help="Comma-separated name=folder (or name=base), two or more.")
    parser.add_argument("--top", type=int, default=15, help="Tokens listed each way.")
    args, rest = parser.parse_known_args(argv)
    models = [spec.split("=", 1) for spec in args.models.split(",") if spec]
    if len(models) < 2 or any(len(spec) != 2 for spec in models):
        parser.error(f"--models: expected two or more name=folder, got {args.models!r}.")

    import torch
    from quality import parse_args
    from quality_rows import build_setup
    from trl.data_utils import maybe_apply_chat_template

    from trl_cadet.data_utils import assistant_markers

    options, passthrough = parse_args(rest)
    if options.threads:
        torch.set_num_threads(options.threads)
    setup = build_setup(vars(options), passthrough)
    tokenizer = setup.tokenizer
    markers = assistant_markers(tokenizer)
    if markers is None:
        parser.error("The tokenizer's chat template has no assistant markers, so replies cannot be told apart.")
    texts = [
        tokenizer(maybe_apply_chat_template({"messages": m}, tokenizer)["text"], add_special_tokens=False)["input_ids"]
        for m in setup.corpus["heldout"]["messages"]
    ]
    kinds = [token_kinds(ids, markers) for ids in texts]

    nll = {}  # name: per text, the NLL of each predicted token
    for name, folder in models:
        model = load(setup, folder).eval()
        with torch.no_grad():
            nll[name] = []
            for ids in texts:
                x = torch.tensor([ids])
                logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
                nll[name].append((-logp.gather(-1, x[0, 1:, None])[:, 0]).tolist())
    names = [name for name, _ in models]
    first, last = names[0], names[-1]

    count = collections.Counter()
    total = collections.defaultdict(float)  # (kind, name)
    per_token = collections.defaultdict(lambda: [0.0, 0])  # (kind, token): [summed NLL change first -> last, count]
    for i, ids in enumerate(texts):
        for t, kind in enumerate(kinds[i]):
            count[kind] += 1
            for name in names:
                total[kind, name] += nll[name][i][t]
            entry = per_token[kind, ids[t + 1]]
            entry[0] += nll[last][i][t] - nll[first][i][t]
            entry[1] += 1

    tokens = sum(count.values())
    print(f"Held-out conversations: {len(texts)}, {tokens} predicted tokens\n")
    header = ["kind", "tokens", *(f"NLL {n}" for n in names), *(f"Δ sum {n}" for n in names[1:])]
    rows = [
        [kind, str(count[kind])]
        + [f"{total[kind, n] / count[kind]:.3f}" for n in names]
        + [f"{total[kind, n] - total[kind, first]:+.1f}" for n in names[1:]]
        for kind in KINDS
        if count[kind]
    ]
    rows.append(
        ["perplexity", str(tokens)]
        + [f"{math.exp(sum(total[k, n] for k in KINDS) / tokens):.3f}" for n in names]
        + [f"{sum(total[k, n] - total[k, first] for k in KINDS):+.1f}" for n in names[1:]]
    )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    ranked = sorted(per_token.items(), key=lambda item: item[1][0])
    for title, items in (("rose", ranked[::-1][: args.top]), ("fell", ranked[: args.top])):
        print(f"\nTokens whose summed NLL {title} most, {first} -> {last} (kind, token, count, sum, mean):")
        for (kind, token), (change, n) in items:
            print(f"  {kind:11s} {tokenizer.decode([token])!r:16s} {n:5d} {change:+8.2f} {change / n:+7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
