"""Render a run's report.html to PNG pictures for the README (docs/report-page*.png).

    python3 -m venv /tmp/wp && /tmp/wp/bin/pip install weasyprint pypdfium2
    /tmp/wp/bin/python docs/make_pictures.py .modelcrew/runs/<run_id>/report.html

WeasyPrint lays out the HTML and CSS for print (it is an HTML/CSS renderer, not a browser: no
JavaScript, which the report does not use) and pypdfium2 rasterises the pages. Neither is a
dependency of modelcrew.
"""

import sys
from pathlib import Path

import pypdfium2
import weasyprint

html = Path(sys.argv[1])
out = Path(__file__).resolve().parent
pdf = pypdfium2.PdfDocument(weasyprint.HTML(filename=str(html)).write_pdf())
for i in range(min(2, len(pdf))):
    pdf[i].render(scale=1.3).to_pil().save(out / f"report-page{i + 1}.png", optimize=True)
print(f"{len(pdf)} pages; wrote {min(2, len(pdf))} pictures to {out}")
