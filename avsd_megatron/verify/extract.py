"""What a completion answers: the last `\\boxed{...}` of a math completion, the program of a code completion.

Used by the graders (`grading`), the feedback view (`data.views`, which also reads the boxed answer of a reference
solution) and evaluation. Pure string functions.
"""

import re

__all__ = ["extract_code", "last_boxed_content", "last_boxed_span"]

_BOXED = "\\boxed{"


def last_boxed_span(text: str, *, skip_unclosed: bool = True) -> tuple[int, int] | None:
    """[start, end) of the last brace-matched `\\boxed{...}` in `text`, or None.

    skip_unclosed: if the last `\\boxed{` never closes, fall back to the one before (views, as the reference's
    privileged_views does); False returns None instead (the reference's evaluation grader).
    """
    start = text.rfind(_BOXED)
    while start != -1:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return start, i
        if not skip_unclosed:
            return None
        start = text.rfind(_BOXED, 0, start)
    return None


def last_boxed_content(text: str, *, skip_unclosed: bool = True) -> str | None:
    """Stripped content of the last brace-matched `\\boxed{...}`, or None (see `last_boxed_span`)."""
    span = last_boxed_span(text, skip_unclosed=skip_unclosed)
    return None if span is None else text[span[0] + len(_BOXED) : span[1] - 1].strip()


# Student code extraction, in the spec's order (3.4).
_FINAL_CODE = re.compile(r"<final_code>\s*(.*?)\s*</final_code>", flags=re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)```", flags=re.DOTALL)
_CODE_LINE = re.compile(
    r"^(?:import\s|from\s+[\w.]+\s+import\s|def\s|class\s|if\s+__name__|for\s|while\s|try:|with\s|print\(|#!"
    r"|@\w|[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*\s*=[^=])"
)


def extract_code(completion: str) -> str:
    """The program in a student completion (spec 3.4): the last <final_code>...</final_code> region if any,
    else the whole text; inside it the last ```python / ```py fence, else the last fence of any language,
    else the text from its first code-looking line on. Newlines normalised, blank edge lines dropped;
    "" if nothing is left (-> extraction_failure)."""
    text = completion.strip()
    regions = _FINAL_CODE.findall(text)
    region = regions[-1] if regions else text
    fences = _FENCE.findall(region)
    python = [body for lang, body in fences if lang.strip().lower().replace(" ", "").startswith("py")]
    if python:
        code = python[-1]
    elif fences:
        code = fences[-1][1]
    else:
        lines = region.splitlines()
        first = next((i for i, line in enumerate(lines) if _CODE_LINE.match(line.lstrip())), 0)
        code = "\n".join(lines[first:])
    lines = code.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)
