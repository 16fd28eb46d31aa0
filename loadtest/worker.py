"""A Locust worker process: `python -m loadtest.worker --master-host H --master-port P`
(or `student load worker ...` on another host).

It waits for the master's `loadtest_plan` message (its share of the arrivals, the target and the
workload), sends those arrivals with its users, and puts its finished samples on Locust's
regular stats reports to the master.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--master-host", default="127.0.0.1", help="the master's host (default 127.0.0.1)")
    parser.add_argument("--master-port", type=int, default=5557, help="the master's port (default 5557)")


def run_worker(master_host: str, master_port: int) -> int:
    import locust
    import locust.runners
    from locust.env import Environment

    from loadtest.customer import SupportCustomer
    from loadtest.engine import IN_FLIGHT_KEY, PLAN_MESSAGE, SAMPLES_KEY, WORKER_REPORT_INTERVAL_S
    from loadtest.feed import FEED_ATTRIBUTE, ArrivalFeed

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(levelname)s %(message)s")
    locust.runners.WORKER_REPORT_INTERVAL = WORKER_REPORT_INTERVAL_S
    env = Environment(user_classes=[SupportCustomer])
    runner = env.create_worker_runner(master_host, master_port)

    def on_plan(environment: Environment, msg, **_kwargs) -> None:
        setattr(environment, FEED_ATTRIBUTE, ArrivalFeed.from_plan(msg.data))

    def on_report(client_id: str, data: dict) -> None:
        feed: ArrivalFeed | None = getattr(env, FEED_ATTRIBUTE, None)
        if feed is not None:
            data[SAMPLES_KEY] = [sample.to_wire() for sample in feed.drain()]
            data[IN_FLIGHT_KEY] = feed.in_flight

    runner.register_message(PLAN_MESSAGE, on_plan)
    env.events.report_to_master.add_listener(on_report)
    runner.greenlet.join()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.worker", description=__doc__)
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    return run_worker(args.master_host, args.master_port)


if __name__ == "__main__":
    sys.exit(main())
