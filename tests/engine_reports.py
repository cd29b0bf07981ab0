"""Reading the delivery engine's reports item by item, for tests that check each item's outcome."""

from __future__ import annotations

from worker.sink.reports import DELIVERED, DeliveredReport, ItemReport, Report


def per_item(report: Report) -> list[Report]:
    """A request's DeliveredReport as one ItemReport an item, so each item's outcome is read alike
    (test_delivered_items_of_a_request_come_in_one_report checks the grouping itself)."""
    if isinstance(report, DeliveredReport):
        return [ItemReport(owner, DELIVERED) for owner in report.owners]
    return [report]
