"""`parser_actions`: the one place that reads argparse's private list of options, watched here."""

from __future__ import annotations

import argparse

from trl_integration.cli.options import parser_actions


def test_every_option_of_the_parser_and_its_groups_in_the_order_added():
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=int, default=1)
    group = parser.add_argument_group("group")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument("--beta")
    exclusive.add_argument("--gamma")
    assert [action.dest for action in parser_actions(parser)] == ["help", "alpha", "beta", "gamma"]
