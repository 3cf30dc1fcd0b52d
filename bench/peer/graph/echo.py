"""The peer's one-node echo graphs for ``make bench-peer``: loaded by ``langgraph dev`` from the peer's own
venv (bench/peer/.venv), never imported by the project or its tests.

Both keep the conversation the way a LangGraph chat app does (``MessagesState``: the add_messages reducer
appends every turn), so the state read after 10 turns holds 20 messages, like trio-runtime's 10-turn thread.
``echo`` answers ``You said: <text>`` in one state update. ``echo_stream`` answers the same and, like
trio-runtime's scripted model, emits one event per word (``get_stream_writer()``, LangGraph's "custom"
stream mode), so a streamed turn does the same work on both servers.
"""

from __future__ import annotations

from langchain_core.messages import AIMessage
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, MessagesState, StateGraph


def reply_to(state: MessagesState) -> str:
    return f"You said: {state['messages'][-1].content}"


def answer(state: MessagesState) -> dict:
    return {"messages": [AIMessage(reply_to(state))]}


def answer_streaming(state: MessagesState) -> dict:
    reply = reply_to(state)
    write = get_stream_writer()
    for i, word in enumerate(reply.split(" ")):
        write({"delta": word if i == 0 else " " + word})
    return {"messages": [AIMessage(reply)]}


def build(node) -> object:
    builder = StateGraph(MessagesState)
    builder.add_node("answer", node)
    builder.add_edge(START, "answer")
    builder.add_edge("answer", END)
    return builder.compile()


graph = build(answer)
graph_stream = build(answer_streaming)
