"""The states of an NBD connection, and the one table of transitions.

Rule 1 (as in h11's ``_state.py``): everything that changes the state of a
connection lives here, in this file, as data.  ``connection.py`` reads the
state freely, but changes it only through ``_Connection._transition(trigger)``,
which looks the new state up in :data:`TRANSITIONS`.  A trigger with no entry
for the current state is a bug in the caller: it raises
:class:`~replfs.nbd.errors.LocalProtocolError`, which breaks the connection
like any other protocol error.

Design note
-----------
The NBD document (``doc/proto.md``, "Protocol phases") has a handshake
(greeting, client flags, option haggling) and a transmission phase.  Each
role walks its own path through them::

    server  SEND_GREETING -> FLAGS -> OPTIONS <-> OPTION_REPLY -> TRANSMISSION -> CLOSED
    client  GREETING -> SEND_FLAGS -> OPTIONS <-> OPTION_REPLY -> TRANSMISSION -> DISC_SENT
                                                       |
                                                       +-> CLOSED  (NBD_OPT_ABORT, or
                                                                    NBD_OPT_EXPORT_NAME refused)

and any state goes to ERROR on a protocol error, whoever's fault it was.
A trigger names what happened, the same way for both roles (the server
*receives* an option, the client *sends* it: both are ``OPTION``), so each
role's table reads like the document's message sequence.

A control connection (``NBD_OPT_X_REPLFS``, replfs's private extension,
``control.py``) needs no state of its own: each call is an option answered
like any other (OPTIONS -> OPTION_REPLY -> OPTIONS), it never enters
TRANSMISSION, and it ends with NBD_OPT_ABORT (CLOSED) or a hang-up.

Within TRANSMISSION nothing changes state but NBD_CMD_DISC: requests and
replies are matched by cookie (the table of requests in flight lives in
the connection), which keeps the hot path free of transitions.
"""

from __future__ import annotations

import enum

from replfs.nbd.errors import LocalProtocolError

SERVER = "server"
CLIENT = "client"


class State(enum.Enum):
    SEND_GREETING = "server: must send the greeting"
    GREETING = "client: waiting for the server's greeting"
    FLAGS = "server: waiting for the client flags"
    SEND_FLAGS = "client: must send its client flags"
    OPTIONS = "server: waiting for an option / client: may send one"
    OPTION_REPLY = "server: must answer the option / client: waiting for the answer"
    TRANSMISSION = "requests and replies"
    DISC_SENT = "client: sent NBD_CMD_DISC; replies to earlier requests may still come"
    CLOSED = "no more traffic expected (after NBD_CMD_DISC, NBD_OPT_ABORT, a refusal)"
    ERROR = "a protocol error broke the connection for good"


class Trigger(enum.Enum):
    GREETING = "the greeting"
    CLIENT_FLAGS = "the client flags"
    OPTION = "an option"
    ANSWERED = "an answer that keeps the negotiation going"
    ENTERED = "a successful NBD_OPT_GO or NBD_OPT_EXPORT_NAME"
    ENDED = "the end of the negotiation (NBD_OPT_ABORT acknowledged, NBD_OPT_EXPORT_NAME refused)"
    DISCONNECT = "NBD_CMD_DISC"
    BROKE = "a protocol error"


INITIAL_STATE = {SERVER: State.SEND_GREETING, CLIENT: State.GREETING}

#: Option haggling, the same for both roles: the server receives an option
#: and sends its answer, the client sends the option and receives the answer.
_NEGOTIATION = {
    State.OPTIONS: {Trigger.OPTION: State.OPTION_REPLY},
    State.OPTION_REPLY: {
        Trigger.ANSWERED: State.OPTIONS,
        Trigger.ENTERED: State.TRANSMISSION,
        Trigger.ENDED: State.CLOSED,
    },
}

#: role -> state -> trigger -> next state.
TRANSITIONS: dict[str, dict[State, dict[Trigger, State]]] = {
    SERVER: {
        State.SEND_GREETING: {Trigger.GREETING: State.FLAGS},  # sent
        State.FLAGS: {Trigger.CLIENT_FLAGS: State.OPTIONS},  # received
        **_NEGOTIATION,
        State.TRANSMISSION: {Trigger.DISCONNECT: State.CLOSED},  # received
    },
    CLIENT: {
        State.GREETING: {Trigger.GREETING: State.SEND_FLAGS},  # received
        State.SEND_FLAGS: {Trigger.CLIENT_FLAGS: State.OPTIONS},  # sent
        **_NEGOTIATION,
        State.TRANSMISSION: {Trigger.DISCONNECT: State.DISC_SENT},  # sent
    },
}

#: Transitions possible from every state (h11: ``process_error``).
FROM_ANY_STATE = {Trigger.BROKE: State.ERROR}

#: States in which the peer closing its end is a clean end of the session.
CLEAN_END = frozenset({State.CLOSED, State.DISC_SENT})


def next_state(role: str, state: State, trigger: Trigger) -> State:
    """The state that ``trigger`` leads to from ``state``."""
    new = TRANSITIONS[role].get(state, {}).get(trigger) or FROM_ANY_STATE.get(trigger)
    if new is None:
        raise LocalProtocolError(f"{role}: {trigger.value} is out of place in state {state.name}")
    return new
