from worker.normalize.identities import IdentityMap


def test_put_reports_new_and_changed_links_only():
    links = IdentityMap(10)
    assert links.put("a1", "u1") is True
    assert links.put("a1", "u1") is False
    assert links.put("a1", "u2") is True
    assert links.get("a1") == "u2" and links.get("nobody") is None


def test_least_recently_used_link_is_evicted_at_the_bound():
    links = IdentityMap(2)
    links.put("a1", "u1")
    links.put("a2", "u2")
    assert links.get("a1") == "u1"  # a1 is now the most recently used
    links.put("a3", "u3")
    assert links.get("a2") is None and links.get("a1") == "u1" and links.get("a3") == "u3"
    assert len(links) == 2
