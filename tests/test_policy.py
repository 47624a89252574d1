"""The commit rule (``_policy.CommitPolicy``), cell by cell: the table of docs/policy.md, as code."""

from __future__ import annotations

import pytest

from fastapi_sessionmaker import CommitPolicy

# (status, raised) -> does it commit?  ``None``: outside HTTP (context_session, task_session).
TABLE = {
    CommitPolicy.AUTO: {(200, False): True, (399, False): True, (400, False): False, (503, False): False},
    CommitPolicy.COMMIT_UNLESS_RAISED: {(200, False): True, (404, False): True, (500, False): True},
    CommitPolicy.MANUAL: {(200, False): False, (404, False): False},
    CommitPolicy.READ_ONLY: {(200, False): False, (404, False): False},
}
OUTSIDE_HTTP = {
    CommitPolicy.AUTO: True,
    CommitPolicy.COMMIT_UNLESS_RAISED: True,
    CommitPolicy.MANUAL: False,
    CommitPolicy.READ_ONLY: False,
}


@pytest.mark.parametrize("policy", list(CommitPolicy))
def test_each_cell_of_the_table(policy: CommitPolicy) -> None:
    for (status, raised), commits in TABLE[policy].items():
        assert policy.should_commit(status=status, raised=raised) is commits, (policy, status)


@pytest.mark.parametrize("policy", list(CommitPolicy))
@pytest.mark.parametrize("status", [200, 201, 404, 500, None])
def test_a_raised_exception_never_commits(policy: CommitPolicy, status: int | None) -> None:
    assert policy.should_commit(status=status, raised=True) is False


@pytest.mark.parametrize("policy", list(CommitPolicy))
def test_outside_http_the_block_commits_unless_the_policy_never_does(policy: CommitPolicy) -> None:
    assert policy.should_commit(status=None, raised=False) is OUTSIDE_HTTP[policy]


def test_policies_are_chosen_by_their_names() -> None:
    assert [CommitPolicy(p.value) for p in CommitPolicy] == list(CommitPolicy)
    with pytest.raises(ValueError, match="sometimes"):
        CommitPolicy("sometimes")
