"""MkDocs hooks: the generated configuration reference, and files that live beside the code.

`<!-- esft:config-reference -->` in a page becomes `esft.reference.config_reference()`, so
the reference is rendered from ESConfig at build time and cannot drift from the flags.
`benchmarks/README.md`, its result figures and the `examples/` specs stay where the scripts
that make them live; they are added to the site as they are, so pages can link to them and
`--strict` checks those links.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent
MARKER = "<!-- esft:config-reference -->"
EXTRA = ("benchmarks/README.md", "benchmarks/results/*.png", "examples/*.yaml")


def on_files(files, config):
    for pattern in EXTRA:
        for path in sorted(ROOT.glob(pattern)):
            rel = path.relative_to(ROOT).as_posix()
            files.append(File(rel, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        from esft.reference import config_reference

        markdown = markdown.replace(MARKER, config_reference())
    return markdown
