"""Prints the shell command that README.md gives after ``<!-- NAME -->`` (the first line of the fenced
block that follows the marker). Used by .ci/run, so that CI runs exactly what the README tells users."""
import pathlib
import sys


def readme_command(name: str, readme: pathlib.Path) -> str:
    lines = readme.read_text().splitlines()
    marker = f"<!-- {name} -->"
    start = lines.index(marker)
    fence = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return lines[fence + 1].strip()


if __name__ == "__main__":
    print(readme_command(sys.argv[1], pathlib.Path(__file__).resolve().parent.parent / "README.md"))
