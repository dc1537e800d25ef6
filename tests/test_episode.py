"""The warn-once-per-episode rule (utils/base/episode.py): pure, no clock."""

from __future__ import annotations

from utils.base.episode import FailureEpisode


def test_first_failure_of_an_episode_is_the_one_to_warn_about() -> None:
    episode = FailureEpisode()
    assert not episode.ongoing and episode.recovered() == 0  # a success with no failure: silent
    assert [episode.failed() for _ in range(4)] == [True, False, False, False]
    assert episode.ongoing and episode.failures == 4


def test_recovery_ends_the_episode_and_says_how_long_it_was() -> None:
    episode = FailureEpisode()
    episode.failed()
    episode.failed()
    assert episode.recovered() == 2
    assert not episode.ongoing and episode.recovered() == 0  # said once
    assert episode.failed() is True  # the next failure starts a new episode: warned again
