"""The bundled tiny code dataset: small stdin -> stdout problems in the code row format (`data.py`, spec 3.4, 5.1),
for CPU runs and tests of the code task (training with the reference / hint / feedback views, pass@k evaluation).

| path                       | what                                                                             |
|----------------------------|----------------------------------------------------------------------------------|
| `tiny_code/train.jsonl`    | one row per problem of `TRAIN_PROBLEMS` (32)                                     |
| `tiny_code/heldout.jsonl`  | one row per problem of `HELDOUT_PROBLEMS` (12), disjoint from train by problem   |

Rebuild with `python -m avsd_megatron tiny-code` (the tiny math set, tokenizer and config are `tiny.py`'s and are
not touched). Each row has `id`, `problem`, `input_format`, `output_format`, `constraints`, `reference_solution` (a
short Python 3 program), `algorithm_hint`, `examples` = `public_tests` (2 tests, shown in the prompt) and
`hidden_tests` (4 more). Test inputs come from `random.Random(seed)` with a per-problem stream, so a row depends
only on its problem and the seed; expected outputs are what the reference program prints for the input, computed
in this process (the programs are this module's own constants, never model output). `tests/data/test_tiny_code.py`
runs every reference on all its tests in the sandbox.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avsd_megatron.data.examples import RowRef, code_example_from_row

__all__ = [
    "HELDOUT_PROBLEMS",
    "TINY_CODE_DIR",
    "TINY_CODE_HELDOUT_PATH",
    "TINY_CODE_TRAIN_PATH",
    "TRAIN_PROBLEMS",
    "CodeProblem",
    "code_rows",
    "run_reference",
    "write_code_assets",
]

TINY_CODE_DIR = Path(__file__).resolve().parent / "assets" / "tiny_code"
TINY_CODE_TRAIN_PATH = TINY_CODE_DIR / "train.jsonl"
TINY_CODE_HELDOUT_PATH = TINY_CODE_DIR / "heldout.jsonl"
DATASET_SEED = 20260520
NUM_PUBLIC = 2
NUM_HIDDEN = 4


@dataclass(frozen=True)
class CodeProblem:
    """One problem: statement fields, a reference program, a hint and a generator of test inputs."""

    id: str
    problem: str
    input_format: str
    output_format: str
    constraints: str
    reference: str
    hint: str
    make_input: Callable[[random.Random], str]


def _ints(rng: random.Random, n: int, lo: int, hi: int) -> str:
    return " ".join(str(rng.randint(lo, hi)) for _ in range(n))


def _n_then_list(lo: int, hi: int, n_lo: int = 1, n_hi: int = 8) -> Callable[[random.Random], str]:
    def make(rng: random.Random) -> str:
        n = rng.randint(n_lo, n_hi)
        return f"{n}\n{_ints(rng, n, lo, hi)}\n"

    return make


def _word(rng: random.Random, lo: int = 1, hi: int = 8, alphabet: str = "abcde") -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


_LIST_IN = "The first line holds n. The second line holds n integers separated by spaces."

_PROBLEMS: tuple[CodeProblem, ...] = (
    CodeProblem("sum_two", "Print the sum of two integers a and b.", "One line with a and b.", "One integer.",
                "-1000 <= a, b <= 1000", "a, b = map(int, input().split())\nprint(a + b)\n",
                "Read both numbers and add them.", lambda r: f"{_ints(r, 2, -1000, 1000)}\n"),
    CodeProblem("diff_two", "Print a minus b.", "One line with a and b.", "One integer.", "-1000 <= a, b <= 1000",
                "a, b = map(int, input().split())\nprint(a - b)\n", "Subtract the second number from the first.",
                lambda r: f"{_ints(r, 2, -1000, 1000)}\n"),
    CodeProblem("product_two", "Print the product of two integers a and b.", "One line with a and b.",
                "One integer.", "-100 <= a, b <= 100", "a, b = map(int, input().split())\nprint(a * b)\n",
                "Multiply the two numbers.", lambda r: f"{_ints(r, 2, -100, 100)}\n"),
    CodeProblem("max_two", "Print the larger of two integers.", "One line with a and b.", "One integer.",
                "-1000 <= a, b <= 1000", "a, b = map(int, input().split())\nprint(max(a, b))\n",
                "Compare the two numbers.", lambda r: f"{_ints(r, 2, -1000, 1000)}\n"),
    CodeProblem("sum_list", "Print the sum of n integers.", _LIST_IN, "One integer.", "1 <= n <= 8",
                "n = int(input())\nprint(sum(map(int, input().split())))\n", "Add all numbers of the list.",
                _n_then_list(-50, 50)),
    CodeProblem("max_list", "Print the largest of n integers.", _LIST_IN, "One integer.", "1 <= n <= 8",
                "n = int(input())\nprint(max(map(int, input().split())))\n", "Track the maximum while scanning.",
                _n_then_list(-50, 50)),
    CodeProblem("min_list", "Print the smallest of n integers.", _LIST_IN, "One integer.", "1 <= n <= 8",
                "n = int(input())\nprint(min(map(int, input().split())))\n", "Track the minimum while scanning.",
                _n_then_list(-50, 50)),
    CodeProblem("range_list", "Print the largest minus the smallest of n integers.", _LIST_IN, "One integer.",
                "1 <= n <= 8", "n = int(input())\na = list(map(int, input().split()))\nprint(max(a) - min(a))\n",
                "Find both the maximum and the minimum.", _n_then_list(-50, 50)),
    CodeProblem("count_even", "Print how many of n integers are even.", _LIST_IN, "One integer.", "1 <= n <= 8",
                "n = int(input())\nprint(sum(1 for x in map(int, input().split()) if x % 2 == 0))\n",
                "A number is even when x % 2 == 0.", _n_then_list(0, 99)),
    CodeProblem("sort_list", "Print n integers in increasing order.", _LIST_IN,
                "One line with the sorted numbers separated by spaces.", "1 <= n <= 8",
                "n = int(input())\nprint(*sorted(map(int, input().split())))\n", "Sort the list.",
                _n_then_list(-50, 50)),
    CodeProblem("reverse_list", "Print n integers in reverse order.", _LIST_IN,
                "One line with the numbers separated by spaces.", "1 <= n <= 8",
                "n = int(input())\nprint(*input().split()[::-1])\n", "Reverse the list.",
                _n_then_list(-50, 50)),
    CodeProblem("prefix_sums", "Print the running sums of n integers.", _LIST_IN,
                "One line with n numbers: the i-th is the sum of the first i inputs.", "1 <= n <= 8",
                "n = int(input())\ns = 0\nout = []\nfor x in map(int, input().split()):\n    s += x\n"
                "    out.append(s)\nprint(*out)\n", "Keep a running total (prefix sums).", _n_then_list(-20, 20)),
    CodeProblem("second_max", "Print the second largest distinct value among n integers.", _LIST_IN,
                "One integer.", "2 <= n <= 8; at least two distinct values",
                "n = int(input())\nvals = sorted(set(map(int, input().split())))\nprint(vals[-2])\n",
                "Remove duplicates with a set, then sort.",
                lambda r: (lambda a: f"{len(a)}\n{' '.join(map(str, a))}\n")(
                    (lambda v: v + [r.choice(v)])(r.sample(range(-20, 21), r.randint(2, 6))))),
    CodeProblem("count_distinct", "Print how many distinct values n integers contain.", _LIST_IN, "One integer.",
                "1 <= n <= 8", "n = int(input())\nprint(len(set(input().split())))\n",
                "Put the numbers in a set.", _n_then_list(0, 5)),
    CodeProblem("reverse_word", "Print the word w reversed.", "One line with the word w.", "One word.",
                "1 <= len(w) <= 8, lowercase letters", "print(input().strip()[::-1])\n",
                "Slice the string with step -1.", lambda r: _word(r) + "\n"),
    CodeProblem("upper_word", "Print the word w in upper case.", "One line with the word w.", "One word.",
                "1 <= len(w) <= 8, lowercase letters", "print(input().strip().upper())\n",
                "Strings have an upper() method.", lambda r: _word(r) + "\n"),
    CodeProblem("count_vowels", "Print how many vowels (a, e, i, o, u) the word w has.", "One line with w.",
                "One integer.", "1 <= len(w) <= 10, lowercase letters",
                "w = input().strip()\nprint(sum(c in 'aeiou' for c in w))\n",
                "Check each character against the vowels.", lambda r: _word(r, 1, 10, "abeiostu") + "\n"),
    CodeProblem("palindrome", "Print YES if the word w reads the same backwards, else NO.", "One line with w.",
                "YES or NO.", "1 <= len(w) <= 8, letters a and b",
                "w = input().strip()\nprint('YES' if w == w[::-1] else 'NO')\n",
                "Compare the word with its reverse.",
                lambda r: (lambda w: (w + w[::-1] if r.random() < 0.5 else w) + "\n")(_word(r, 1, 4, "ab"))),
    CodeProblem("word_count", "Print the number of words on a line.", "One line of words separated by spaces.",
                "One integer.", "1 to 8 words", "print(len(input().split()))\n", "Split on whitespace.",
                lambda r: " ".join(_word(r) for _ in range(r.randint(1, 8))) + "\n"),
    CodeProblem("repeat_word", "Print the word w repeated k times with no spaces.", "One line with w and k.",
                "One word.", "1 <= k <= 4", "w, k = input().split()\nprint(w * int(k))\n",
                "Multiply the string by k.", lambda r: f"{_word(r, 1, 4)} {r.randint(1, 4)}\n"),
    CodeProblem("digit_sum", "Print the sum of the decimal digits of n.", "One line with n.", "One integer.",
                "0 <= n <= 10^9", "print(sum(int(c) for c in input().strip()))\n",
                "Add the digits one by one.", lambda r: f"{r.randint(0, 10**9)}\n"),
    CodeProblem("factorial", "Print n factorial.", "One line with n.", "One integer.", "0 <= n <= 12",
                "n = int(input())\nf = 1\nfor i in range(2, n + 1):\n    f *= i\nprint(f)\n",
                "Multiply 1 * 2 * ... * n.", lambda r: f"{r.randint(0, 12)}\n"),
    CodeProblem("gcd_two", "Print the greatest common divisor of a and b.", "One line with a and b.",
                "One integer.", "1 <= a, b <= 10^6", "import math\na, b = map(int, input().split())\n"
                "print(math.gcd(a, b))\n", "Euclid's algorithm: gcd(a, b) = gcd(b, a mod b).",
                lambda r: (lambda g: f"{g * r.randint(1, 50)} {g * r.randint(1, 50)}\n")(r.randint(1, 30))),
    CodeProblem("fizzbuzz", "For i from 1 to n print Fizz if 3 divides i, Buzz if 5 does, FizzBuzz if both, else i.",
                "One line with n.", "n lines.", "1 <= n <= 20",
                "n = int(input())\nfor i in range(1, n + 1):\n    s = ('Fizz' if i % 3 == 0 else '') + "
                "('Buzz' if i % 5 == 0 else '')\n    print(s or i)\n",
                "Test divisibility by 3 and 5 for each i.", lambda r: f"{r.randint(1, 20)}\n"),
    CodeProblem("is_prime", "Print YES if n is prime, else NO.", "One line with n.", "YES or NO.", "1 <= n <= 10^4",
                "n = int(input())\nok = n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n"
                "print('YES' if ok else 'NO')\n", "Try divisors up to the square root.",
                lambda r: f"{r.randint(1, 10**4)}\n"),
    CodeProblem("fibonacci", "Print the n-th Fibonacci number, F(0) = 0 and F(1) = 1.", "One line with n.",
                "One integer.", "0 <= n <= 40", "n = int(input())\na, b = 0, 1\nfor _ in range(n):\n"
                "    a, b = b, a + b\nprint(a)\n", "Iterate with two variables.", lambda r: f"{r.randint(0, 40)}\n"),
    CodeProblem("sum_to_n", "Print 1 + 2 + ... + n.", "One line with n.", "One integer.", "0 <= n <= 10^6",
                "n = int(input())\nprint(n * (n + 1) // 2)\n", "Use the formula n(n+1)/2.",
                lambda r: f"{r.randint(0, 10**6)}\n"),
    CodeProblem("power_mod", "Print a to the power b modulo 1000000007.", "One line with a and b.", "One integer.",
                "0 <= a, b <= 10^9", "a, b = map(int, input().split())\nprint(pow(a, b, 10**9 + 7))\n",
                "Fast modular exponentiation: pow(a, b, MOD).", lambda r: f"{_ints(r, 2, 0, 10**9)}\n"),
    CodeProblem("binary", "Print n in binary without leading zeros.", "One line with n.", "One binary string.",
                "0 <= n <= 10^6", "print(bin(int(input()))[2:])\n", "bin(n) gives the digits after '0b'.",
                lambda r: f"{r.randint(0, 10**6)}\n"),
    CodeProblem("count_char", "Print how many times the letter c occurs in the word w.", "One line with w and c.",
                "One integer.", "1 <= len(w) <= 10", "w, c = input().split()\nprint(w.count(c))\n",
                "Count the matching characters.", lambda r: f"{_word(r, 1, 10, 'abc')} {r.choice('abc')}\n"),
    CodeProblem("abs_diff_pairs", "Print the absolute difference of each pair of integers on its own line.",
                "The first line holds q. Each of the next q lines holds two integers.", "q lines.", "1 <= q <= 5",
                "q = int(input())\nfor _ in range(q):\n    a, b = map(int, input().split())\n    print(abs(a - b))\n",
                "Read q pairs and print abs(a - b) for each.",
                lambda r: (lambda q: f"{q}\n" + "".join(f"{_ints(r, 2, -99, 99)}\n" for _ in range(q)))(
                    r.randint(1, 5))),
    CodeProblem("average_floor", "Print the average of n integers rounded down.", _LIST_IN, "One integer.",
                "1 <= n <= 8, 0 <= values <= 100", "n = int(input())\nprint(sum(map(int, input().split())) // n)\n",
                "Integer division of the sum by n.", _n_then_list(0, 100)),
    # held-out problems (HELDOUT_PROBLEMS)
    CodeProblem("min_two", "Print the smaller of two integers.", "One line with a and b.", "One integer.",
                "-1000 <= a, b <= 1000", "a, b = map(int, input().split())\nprint(min(a, b))\n",
                "Compare the two numbers.", lambda r: f"{_ints(r, 2, -1000, 1000)}\n"),
    CodeProblem("sum_squares", "Print the sum of the squares of n integers.", _LIST_IN, "One integer.",
                "1 <= n <= 8", "n = int(input())\nprint(sum(x * x for x in map(int, input().split())))\n",
                "Square each number, then add.", _n_then_list(-20, 20)),
    CodeProblem("count_positive", "Print how many of n integers are greater than zero.", _LIST_IN, "One integer.",
                "1 <= n <= 8", "n = int(input())\nprint(sum(1 for x in map(int, input().split()) if x > 0))\n",
                "Count the numbers with x > 0.", _n_then_list(-9, 9)),
    CodeProblem("sort_desc", "Print n integers in decreasing order.", _LIST_IN,
                "One line with the sorted numbers separated by spaces.", "1 <= n <= 8",
                "n = int(input())\nprint(*sorted(map(int, input().split()), reverse=True))\n",
                "Sort with reverse=True.", _n_then_list(-50, 50)),
    CodeProblem("lower_word", "Print the word w in lower case.", "One line with w.", "One word.",
                "1 <= len(w) <= 8, letters", "print(input().strip().lower())\n", "Strings have a lower() method.",
                lambda r: _word(r, 1, 8, "abcABC") + "\n"),
    CodeProblem("word_length", "Print the length of the word w.", "One line with w.", "One integer.",
                "1 <= len(w) <= 12", "print(len(input().strip()))\n", "len() gives the length.",
                lambda r: _word(r, 1, 12) + "\n"),
    CodeProblem("digit_count", "Print the number of decimal digits of n.", "One line with n.", "One integer.",
                "0 <= n <= 10^12", "print(len(input().strip()))\n", "Count the characters of n as text.",
                lambda r: f"{r.randint(0, 10**r.randint(1, 12))}\n"),
    CodeProblem("lcm_two", "Print the least common multiple of a and b.", "One line with a and b.", "One integer.",
                "1 <= a, b <= 1000", "import math\na, b = map(int, input().split())\nprint(a * b // math.gcd(a, b))\n",
                "lcm(a, b) = a * b / gcd(a, b).", lambda r: f"{_ints(r, 2, 1, 1000)}\n"),
    CodeProblem("square", "Print n squared.", "One line with n.", "One integer.", "-10^4 <= n <= 10^4",
                "n = int(input())\nprint(n * n)\n", "Multiply n by itself.", lambda r: f"{r.randint(-10**4, 10**4)}\n"),
    CodeProblem("even_odd", "Print EVEN if n is even, else ODD.", "One line with n.", "EVEN or ODD.",
                "0 <= n <= 10^9", "print('EVEN' if int(input()) % 2 == 0 else 'ODD')\n", "Check n % 2.",
                lambda r: f"{r.randint(0, 10**9)}\n"),
    CodeProblem("max_pair_sum", "Print the largest sum of two different elements of a list of n integers.",
                _LIST_IN, "One integer.", "2 <= n <= 8",
                "n = int(input())\na = sorted(map(int, input().split()))\nprint(a[-1] + a[-2])\n",
                "Sort, then add the two largest.",
                lambda r: (lambda n: f"{n}\n{_ints(r, n, -50, 50)}\n")(r.randint(2, 8))),
    CodeProblem("first_last", "Print the first and the last of n integers.", _LIST_IN,
                "One line with two integers.", "1 <= n <= 8",
                "n = int(input())\na = input().split()\nprint(a[0], a[-1])\n", "Index 0 and index -1.",
                _n_then_list(-50, 50)),
)

NUM_TRAIN_PROBLEMS = 32
TRAIN_PROBLEMS: tuple[CodeProblem, ...] = _PROBLEMS[:NUM_TRAIN_PROBLEMS]
HELDOUT_PROBLEMS: tuple[CodeProblem, ...] = _PROBLEMS[NUM_TRAIN_PROBLEMS:]


def run_reference(code: str, stdin: str) -> str:
    """What `code` (one of this module's reference programs: trusted) prints for `stdin`, run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), _stdin(stdin):
        exec(compile(code, "<reference>", "exec"), {"__name__": "__main__"})  # noqa: S102 - our own constants
    return out.getvalue()


@contextlib.contextmanager
def _stdin(text: str):
    saved, sys.stdin = sys.stdin, io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


def _problem_seed(problem_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{problem_id}".encode(), digest_size=8).digest(), "little")


def code_row(problem: CodeProblem, seed: int = DATASET_SEED) -> dict[str, Any]:
    """The row of one problem: NUM_PUBLIC + NUM_HIDDEN distinct test inputs, expected outputs from its reference."""
    rng = random.Random(_problem_seed(problem.id, seed))
    inputs: list[str] = []
    for _ in range(200):
        text = problem.make_input(rng)
        if text not in inputs:
            inputs.append(text)
        if len(inputs) == NUM_PUBLIC + NUM_HIDDEN:
            break
    tests = [{"input": text, "output": run_reference(problem.reference, text)} for text in inputs]
    return {
        "id": problem.id, "problem": problem.problem, "input_format": problem.input_format,
        "output_format": problem.output_format, "constraints": problem.constraints,
        "examples": tests[:NUM_PUBLIC], "public_tests": tests[:NUM_PUBLIC], "hidden_tests": tests[NUM_PUBLIC:],
        "reference_solution": problem.reference, "algorithm_hint": problem.hint,
    }


def code_rows(problems: tuple[CodeProblem, ...], seed: int = DATASET_SEED) -> list[dict[str, Any]]:
    """Rows of `problems`, each validated by `data.code_example_from_row` (raises BadRowError on a bad row)."""
    rows = [code_row(p, seed) for p in problems]
    for index, row in enumerate(rows):
        code_example_from_row(row, RowRef("tiny_code.code_rows", index))
    return rows


def write_code_assets(out_dir: str | Path = TINY_CODE_DIR) -> tuple[Path, Path]:
    """(Re)write train.jsonl and heldout.jsonl under `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "train.jsonl", out / "heldout.jsonl")
    for path, problems in zip(paths, (TRAIN_PROBLEMS, HELDOUT_PROBLEMS)):
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for row in code_rows(problems):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m avsd_megatron tiny-code", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(TINY_CODE_DIR), help=f"output directory (default {TINY_CODE_DIR})")
    args = parser.parse_args(argv)
    for path in write_code_assets(args.out):
        print(path)


if __name__ == "__main__":
    main()
