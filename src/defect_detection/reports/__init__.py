"""Self-contained HTML pages (report.html per run, a comparison page) rendered with Jinja2."""
