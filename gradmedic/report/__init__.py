"""Reports: matplotlib figures and self-contained HTML pages for a lab suite, a trace or a check."""

from gradmedic.report.html import Page, write_page
from gradmedic.report.pages import report_page, suite_page

__all__ = ["Page", "report_page", "suite_page", "write_page"]
