"""Markdown tables printed and written as their rows are measured, so that a run cut short keeps what it did."""
from pathlib import Path


class Report:
    def __init__(self, out: Path | None, *header: str):
        self.out, self.lines = out, []
        self.add(*header)

    def add(self, *lines: str) -> None:
        self.lines += lines
        print(*lines, sep="\n", flush=True)
        if self.out:
            self.out.write_text("\n".join(self.lines) + "\n")
