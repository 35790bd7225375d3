"""Writes a greedy.jsonl in the format of ../shared/reference (see its
README) for prompts other than the reference folder's, with a running
llama-server: per prompt, the prompt's tokens, 32 greedy tokens, and per
step the chosen token's log-probability and the five most likely tokens'
(llama-server reports no step for a token that ends inside a UTF-8
character, as in the reference files).

usage: held_out_reference.py URL OUT.jsonl [LONG_TEXT_FILE...]

Each long text file adds one prompt: its first 4,500 characters.
"""

import json
import sys
import urllib.request

PROMPTS = [
    "The capital of France is",
    "Water boils at",
    "My favourite recipe for bread starts with",
    "The quick brown fox",
    "In the beginning of the twentieth century,",
    "Here are three tips for better sleep:\n1.",
    "Q: What is the largest planet in our solar system?\nA:",
    "def quicksort(arr):\n",
    "SELECT name, age FROM users WHERE",
    "The theory of relativity states that",
    "Dear Sir or Madam,\n\nI am writing to",
    "Photosynthesis is the process by which",
    "fn main() {\n    let",
    "The stock market fell sharply today after",
    "Once there was a dragon who",
    "To install the package, run",
    "La vie est",
    "Der schnellste Weg nach Berlin ist",
    "El sol sale por",
    "東京は日本の",
    "The best way to learn a new language is",
    "#include <stdio.h>\n\nint main(void) {\n",
    "Ingredients:\n- 2 cups flour\n-",
    "Chapter 1\n\nIt was a cold morning when",
    "The mitochondria is",
    "function add(a, b) {",
    "A triangle has three sides and",
    "The year 1969 is remembered because",
    "Breaking news:",
    "import torch\nimport torch.nn as nn\n\nclass",
    "10, 20, 30, 40,",
    "The opposite of hot is",
    "Machine learning models are trained by",
    "She opened the door and saw",
    '<div class="container">\n',
    "The cat sat on the",
    "Rust is a programming language that",
    "In conclusion, the results show that",
    "Knock knock. Who's there?",
    "The GPU market is dominated by",
    "Once upon a midnight dreary,",
    "print('Hello, world')\n",
    "The human heart has four chambers:",
    "Monday, Tuesday, Wednesday,",
    "A good manager should always",
    "The history of the Roman Empire",
    "Quantum computers use qubits, which",
    "The weather forecast for tomorrow is",
]


def post(url, path, body):
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def main():
    url, out, long_files = sys.argv[1], sys.argv[2], sys.argv[3:]
    prompts = PROMPTS + [open(f, encoding="utf-8").read()[:4500] for f in long_files]
    with open(out, "w", encoding="utf-8") as f:
        for prompt in prompts:
            tokens = post(url, "/tokenize", {"content": prompt, "add_special": True})["tokens"]
            reply = post(
                url,
                "/completion",
                {
                    "prompt": tokens,
                    "n_predict": 32,
                    "temperature": 0,
                    "n_probs": 5,
                    "cache_prompt": False,
                    "return_tokens": True,
                },
            )
            steps = [
                {
                    "id": s["id"],
                    "logprob": s["logprob"],
                    "top": [{"id": t["id"], "logprob": t["logprob"]} for t in s["top_logprobs"]],
                }
                for s in reply["completion_probabilities"]
            ]
            line = {
                "prompt": prompt,
                "prompt_tokens": tokens,
                "completion": reply["content"],
                # Steps leave out tokens that end inside a UTF-8 character:
                # they are a subsequence of these.
                "tokens": reply["tokens"],
                "steps": steps,
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
