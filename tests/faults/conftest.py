"""The fault suite's table: each fault test adds one row; pytest prints them at the end of the session."""
import pytest

HEADER = ("fault", "tried", "lost", "half-published", "orphans", "recovered in")
ROWS = []


@pytest.fixture
def fault_table():
    return ROWS


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    widths = [max(len(str(row[i])) for row in [HEADER] + ROWS) for i in range(len(HEADER))]
    terminalreporter.section("fault suite")
    for row in [HEADER] + ROWS:
        terminalreporter.write_line(" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
