import pytest

from offload.errors import BudgetError
from offload.sizes import format_bytes, parse_size


@pytest.mark.parametrize("text,expected", [
    ("512MB", 512 * 10**6), ("8GB", 8 * 10**9), ("1.5GiB", int(1.5 * 2**30)),
    ("200 MB", 200 * 10**6), ("123456", 123456), (4096, 4096), ("2k", 2048), ("10kib", 10240),
])
def test_parse(text, expected):
    assert parse_size(text) == expected


def test_percentage_of_the_model():
    assert parse_size("25%", total_bytes=1000) == 250
    with pytest.raises(BudgetError, match="percentage"):
        parse_size("25%")
    with pytest.raises(BudgetError, match=r"\(0, 100\]"):
        parse_size("150%", total_bytes=1000)


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "-5MB", "0", "MB", "", "1.2.3GB", True, -1])
def test_malformed_budget_names_the_fix(bad):
    with pytest.raises(BudgetError) as e:
        parse_size(bad)
    assert "budget" in str(e.value)


def test_format():
    assert format_bytes(2_200_000_000) == "2.20 GB"
    assert format_bytes(512) == "512 B"
