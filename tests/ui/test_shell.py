"""The studio opens in a real browser with its header and four tabs in workflow order."""

from playwright.sync_api import expect


def test_four_tabs_and_header(page, demo_studio):
    page.goto(demo_studio)
    tabs = page.get_by_role("tab")
    expect(tabs).to_have_count(4)
    assert [t.strip() for t in tabs.all_inner_texts()] == ["Clips", "Captions", "Train", "Generate"]
    header = page.locator("#studio-header")
    expect(header).to_contain_text("Demo project")
    expect(header).to_contain_text("tiny-wan2.1-i2v")
    expect(header).to_contain_text("tiny-blip2")
    expect(header).to_contain_text("CPU")
