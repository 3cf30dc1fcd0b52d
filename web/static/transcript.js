// The thread view's transcript: one <section> per turn, one element per item, built from GET
// /v1/threads/{id} and then grown by events. Items and turns are keyed by id, so applying the same item
// twice updates it instead of adding a copy. Streaming text goes into a Text node (appendData), which keeps
// a long reply cheap to grow.

export const FINISHED = new Set(['completed', 'failed', 'interrupted', 'canceled']);

// Item kind -> data-role of its message (API.md, "Web UI" hooks). Kinds not listed are shown as notes.
const ROLES = {
  user_message: 'user',
  agent_message: 'assistant',
  agent_reasoning: 'reasoning',
  tool_call: 'tool',
};
const WHO = { user: 'You', assistant: 'Assistant' };
const TURN_ACTIONS = [
  ['fork', 'Fork', 'Fork a new thread with the history up to and including this turn'],
  ['rewind', 'Rewind', 'Remove this turn and every later one from the live history'],
  ['retry', 'Retry', 'Remove this turn and later ones, then run this prompt again'],
];

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function errorText(error) {
  if (!error) return '';
  if (typeof error === 'string') return error;
  return error.message || JSON.stringify(error);
}

export class Transcript {
  // root: the transcript element; actions: {fork, rewind, retry} called with a turn id.
  constructor(root, actions) {
    this.root = root;
    this.turns = new Map(); // turn id -> {id, status, usage, el, itemsEl, ...} in display order
    this.items = new Map(); // item id -> {id, kind, el, text (Text node), ...}
    // One listener for every turn's buttons (a 1,000-turn thread would otherwise carry 3,000 listeners).
    root.addEventListener('click', (event) => {
      const button = event.target.closest('button[data-action]');
      if (!button || button.disabled) return;
      const section = button.closest('section.turn');
      if (section) actions[button.dataset.action](section.dataset.turnId);
    });
  }

  load(turns, items) {
    this.turns.clear();
    this.items.clear();
    const fragment = document.createDocumentFragment();
    for (const turn of turns) fragment.append(this._newTurn(turn.id, turn).el);
    for (const item of items) {
      const turn = this.turns.get(item.turn_id);
      if (turn) this._newItem(turn, item.id, item.kind, item.metadata || {}, item.detail ?? item.summary ?? '', item.status);
    }
    this.root.replaceChildren(fragment);
  }

  // Older turns (a page before the oldest on screen) go above the others; the scroll position stays put.
  prepend(turns, items) {
    const later = [...this.turns];
    this.turns.clear();
    const fragment = document.createDocumentFragment();
    for (const turn of turns) fragment.append(this._newTurn(turn.id, turn).el);
    for (const [id, turn] of later) if (!this.turns.has(id)) this.turns.set(id, turn);
    for (const item of items) {
      const turn = this.turns.get(item.turn_id);
      if (turn && !this.items.has(item.id)) {
        this._newItem(turn, item.id, item.kind, item.metadata || {}, item.detail ?? item.summary ?? '', item.status);
      }
    }
    const height = this.root.scrollHeight;
    this.root.prepend(fragment);
    this.root.scrollTop += this.root.scrollHeight - height;
  }

  scrollToEnd() {
    this.root.scrollTop = this.root.scrollHeight;
  }

  latestTurn() {
    let last = null;
    for (const turn of this.turns.values()) last = turn;
    return last;
  }

  turnStatus(turnId) {
    const turn = this.turns.get(turnId);
    return turn ? turn.status : null;
  }

  totalUsage() {
    let input = 0;
    let output = 0;
    for (const turn of this.turns.values()) {
      input += (turn.usage && turn.usage.input_tokens) || 0;
      output += (turn.usage && turn.usage.output_tokens) || 0;
    }
    return { input, output };
  }

  ensureTurn(turnId) {
    return this._ensureTurn(turnId);
  }

  setItemStatus(itemId, status) {
    const item = this.items.get(itemId);
    if (item) this._setItemStatus(item, status);
  }

  _ensureTurn(turnId) {
    let turn = this.turns.get(turnId);
    if (!turn) {
      turn = this._newTurn(turnId, { status: 'in_progress' });
      this.root.append(turn.el);
    }
    return turn;
  }

  _newTurn(turnId, record) {
    const section = el('section', 'turn');
    section.dataset.turnId = turnId;
    const itemsEl = el('div', 'items');
    const errorEl = el('p', 'turn-error');
    errorEl.setAttribute('role', 'alert');
    errorEl.hidden = true;
    const foot = el('footer', 'turn-foot');
    const badge = el('span', 'badge');
    const usage = el('span', 'usage');
    foot.append(badge, usage);
    const buttons = [];
    for (const [action, label, title] of TURN_ACTIONS) {
      const button = el('button', 'quiet small', label);
      button.type = 'button';
      button.dataset.action = action;
      button.dataset.testid = action;
      button.title = title;
      button.setAttribute('aria-label', `${label}: ${title.toLowerCase()}`);
      buttons.push(button);
      foot.append(button);
    }
    section.append(itemsEl, errorEl, foot);
    const turn = { id: turnId, status: null, usage: null, el: section, itemsEl, errorEl, badge, usageEl: usage, buttons };
    this.turns.set(turnId, turn);
    this._setStatus(turn, record.status || 'in_progress');
    this._setUsage(turn, record.usage);
    if (record.error) this._setError(turn, record.error);
    return turn;
  }

  _setStatus(turn, status) {
    turn.status = status;
    turn.badge.textContent = status.replace(/_/g, ' ');
    turn.badge.dataset.status = status;
    turn.el.dataset.status = status;
    const finished = FINISHED.has(status);
    for (const button of turn.buttons) button.disabled = !finished;
  }

  _setUsage(turn, usage) {
    turn.usage = usage || null;
    turn.usageEl.textContent = usage ? `${usage.input_tokens} in / ${usage.output_tokens} out tokens` : '';
  }

  _setError(turn, error) {
    turn.errorEl.textContent = `Error: ${errorText(error)}`;
    turn.errorEl.hidden = false;
  }

  setTurnStatus(turnId, status) {
    const turn = this.turns.get(turnId);
    if (turn && !FINISHED.has(turn.status)) this._setStatus(turn, status);
  }

  turnStarted(turnId, payload) {
    const turn = this._ensureTurn(turnId);
    if (!FINISHED.has(turn.status)) this._setStatus(turn, payload.status && payload.status !== 'queued' ? payload.status : 'in_progress');
    this.scrollToEnd();
  }

  turnCompleted(turnId, payload) {
    const turn = this._ensureTurn(turnId);
    this._setStatus(turn, payload.status || 'completed');
    this._setUsage(turn, payload.usage);
    if (payload.error) this._setError(turn, payload.error);
    for (const item of this.items.values()) {
      if (item.turnId === turnId && item.status === 'in_progress') this._setItemStatus(item, payload.status || 'completed');
    }
  }

  removeTurns(turnIds) {
    for (const turnId of turnIds) {
      const turn = this.turns.get(turnId);
      if (!turn) continue;
      turn.el.remove();
      this.turns.delete(turnId);
      for (const [itemId, item] of this.items) if (item.turnId === turnId) this.items.delete(itemId);
    }
  }

  _newItem(turn, itemId, kind, metadata, text, status) {
    const role = ROLES[kind];
    let node;
    let textNode = document.createTextNode(text || '');
    let resultLabel = null;
    if (role === 'reasoning') {
      node = el('details', 'msg reasoning');
      const summary = el('summary', null, 'Reasoning');
      const body = el('div', 'text');
      body.append(textNode);
      node.append(summary, body);
    } else if (role === 'tool') {
      node = el('div', 'msg tool');
      const head = el('div', 'who', `Tool call: ${metadata.name || 'tool'}`);
      const input = el('pre', 'tool-input', JSON.stringify(metadata.input ?? {}, null, 2));
      resultLabel = el('div', 'who small', 'Result');
      const result = el('pre', 'tool-result');
      result.append(textNode);
      node.append(head, input, resultLabel, result);
    } else if (role) {
      node = el('div', `msg ${role}`);
      const body = el('div', 'text');
      body.append(textNode);
      node.append(el('div', 'who', WHO[role]), body);
    } else if (kind === 'error') {
      node = el('div', 'item-error');
      node.setAttribute('role', 'alert');
      node.append(textNode);
    } else {
      node = el('div', 'note');
      node.append(el('span', 'who small', `${kind.replace(/_/g, ' ')}: `), textNode);
    }
    if (role) {
      node.dataset.testid = 'message';
      node.dataset.role = role;
    }
    node.dataset.itemId = itemId;
    const item = { id: itemId, turnId: turn.id, kind, el: node, text: textNode, resultLabel, metadata, status: null };
    this._setItemStatus(item, status || 'in_progress');
    this.items.set(itemId, item);
    turn.itemsEl.append(node);
    return item;
  }

  _setItemStatus(item, status) {
    item.status = status;
    item.el.dataset.status = status;
    if (item.resultLabel) {
      const error = item.metadata && item.metadata.is_error;
      item.resultLabel.textContent = status === 'awaiting_approval' ? 'Waiting for approval'
        : status === 'in_progress' ? 'Running…' : error ? 'Result (error)' : 'Result';
    }
  }

  _ensureItem(turnId, itemId, kind, metadata) {
    let item = this.items.get(itemId);
    if (!item) item = this._newItem(this._ensureTurn(turnId), itemId, kind || 'agent_message', metadata || {}, '', 'in_progress');
    return item;
  }

  itemStarted(turnId, itemId, payload) {
    const { kind, ...metadata } = payload;
    this._ensureItem(turnId, itemId, kind, metadata);
    this.scrollToEnd();
  }

  itemDelta(turnId, itemId, payload) {
    const item = this._ensureItem(turnId, itemId, payload.kind);
    item.text.appendData(payload.delta || '');
    this._keepAtEnd();
  }

  itemEnded(turnId, itemId, status, payload) {
    const item = this._ensureItem(turnId, itemId, payload.kind, payload.metadata);
    if (payload.metadata) item.metadata = { ...item.metadata, ...payload.metadata };
    if (typeof payload.text === 'string') item.text.data = payload.text;
    this._setItemStatus(item, status);
    this._keepAtEnd();
  }

  // Follows a growing reply only while the reader is at the bottom (scrolling up to read stays put).
  _keepAtEnd() {
    const root = this.root;
    if (root.scrollHeight - root.scrollTop - root.clientHeight < 120) root.scrollTop = root.scrollHeight;
  }
}
