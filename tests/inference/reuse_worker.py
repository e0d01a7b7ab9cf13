"""One inference process of the two-process reuse test (run as ``python -m tests.inference.reuse_worker``).

Loads the tiny model from a local directory, connects to the engine with ClientKVStore, runs
``generate_with_cache`` on the prompt, and prints one JSON line: the cached/computed token
counts, the greedy tokens, and the greedy tokens of a cache-free full recomputation.
"""

from __future__ import annotations

import argparse
import json

from kvcache_engine.inference import load_model
from kvcache_engine.integrations.transformers import ClientKVStore, generate_with_cache
from tests.inference.test_generator import reference_greedy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token-file", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    loaded = load_model(args.model, "float32")
    with ClientKVStore.connect(
        loaded.model, endpoints=[args.url], token_file=args.token_file, strict=True
    ) as store:
        out = generate_with_cache(
            loaded.model, loaded.tokenizer, store, args.prompt, max_new_tokens=args.max_new_tokens
        )
    ids = loaded.tokenizer(args.prompt)["input_ids"]
    print(json.dumps({
        "prompt_tokens": out.prompt_tokens,
        "cached_tokens": out.cached_tokens,
        "computed_tokens": out.computed_tokens,
        "output_ids": out.output_ids,
        "reference_ids": reference_greedy(loaded.model, ids, args.max_new_tokens),
        "namespace": store.config.namespace,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
