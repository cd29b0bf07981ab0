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


def test_a_watcher_hears_of_new_and_changed_links_only_once_the_map_holds_them():
    links = IdentityMap(10)
    links.put("before", "u0")
    changes = links.watch()
    links.put("a1", "u1")
    links.put("a1", "u1")  # already known: nothing new to hear
    links.put("a1", "u2")
    links.forget("a1")
    assert list(changes) == ["a1", "a1"]


def test_a_watch_is_bounded_when_nobody_pops():
    links = IdentityMap(100)
    changes = links.watch(max_pending=3)
    for i in range(5):
        links.put(f"a{i}", "u")
    assert list(changes) == ["a2", "a3", "a4"]
