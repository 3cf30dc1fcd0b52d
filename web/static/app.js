// The trio-runtime dashboard: vanilla ES modules, no framework, no build step (docs/design.md, "Web UI").
// Everything it shows comes from the /v1 API with the HttpOnly cookie (POST /v1/auth/cookie); the thread
// view follows GET /v1/threads/{id} and then its event stream (EventSource, cookie auth, never ?token=).
// Events are applied at most once: each carries a global seq, and one at or below the last applied seq is
// dropped, so a reconnect (Last-Event-ID) can neither duplicate nor lose a message.

import { api, ApiError, onUnauthorized, q } from './api.js';
import { Transcript, FINISHED } from './transcript.js';

const $ = (id) => document.getElementById(id);

// Named SSE events the view applies (API.md, "Events"): EventSource delivers a named event only to a
// listener registered for that name.
const EVENT_NAMES = [
  'thread.started', 'thread.updated', 'thread.forked', 'thread.rewound', 'thread.restored', 'thread.deleted',
  'turn.started', 'turn.steered', 'turn.interrupt_requested', 'turn.retrying', 'turn.completed',
  'item.started', 'item.delta', 'item.completed', 'item.failed', 'item.interrupted',
  'approval.requested', 'approval.resolved', 'session.saved',
];
// A closed stream (server gone, or it answered an error) is reopened after this delay, doubling up to the
// cap: quick enough that a restarted local server is picked up within a few seconds.
const RECONNECT_FIRST_MS = 500;
const RECONNECT_CAP_MS = 4000;
// The thread list has no event stream of its own; it is re-read this often while the page is visible.
const THREAD_LIST_REFRESH_MS = 5000;
const SEARCH_DEBOUNCE_MS = 200;

const state = {
  signedIn: false,
  threads: [],
  threadId: null, // the thread on screen
  thread: null, // its ThreadRecord
  lastSeq: 0, // the highest seq applied to the view: anything at or below it is a duplicate
  source: null, // its EventSource
  reconnectTimer: null,
  reconnectDelay: RECONNECT_FIRST_MS,
  replay: null, // {turnId, until}: while the stream replays up to seq `until`, only that turn's events apply
  olderCursor: null, // page.next_before of the oldest page on screen: older turns exist (null: none)
  revisions: new Map(), // session id -> the revision this page last saved or saw (sent as If-Match)
  approvals: new Map(), // approval id -> card element
  threadsDrawn: '', // what the thread list on screen was drawn from
  threadsAsked: 0, // reads of the thread list and of the sessions list sent so far: only the last one's
  sessionsAsked: 0, // answer is drawn
};

const transcript = new Transcript($('transcript'), {
  fork: (turnId) => act(() => forkAt(turnId)),
  rewind: (turnId) => act(() => rewindTo(turnId)),
  retry: (turnId) => act(() => retryTurn(turnId)),
});

// ---------------------------------------------------------------------------------------------- notices

function notice(text) {
  $('notice').textContent = text || '';
}

// Runs an action from a click or key: its error becomes the notice instead of an unhandled rejection.
async function act(action) {
  try {
    notice('');
    return await action();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return undefined; // the sign-in form is shown
    notice(err.message || String(err));
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------- sign-in

function showLogin(message = '') {
  state.signedIn = false;
  closeStream();
  $('connection-status').hidden = true;
  $('app').hidden = true;
  $('sign-out').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message;
  $('login-token').focus();
}

async function showApp() {
  state.signedIn = true;
  $('login').hidden = true;
  $('app').hidden = false;
  $('sign-out').hidden = false;
  $('connection-status').hidden = false;
  await refreshThreads();
  setConnection('live'); // the server answered; a thread's stream takes over when one is opened
  const wanted = location.hash.match(/^#\/thread\/([A-Za-z0-9_-]+)$/);
  if (wanted) await openThread(wanted[1]);
}

// Exchanges a bearer token for the HttpOnly cookie; the token itself is kept nowhere by the page.
async function signIn(token) {
  await api('POST', '/v1/auth/cookie', { bearer: token.trim() });
}

async function boot() {
  onUnauthorized(() => {
    if (state.signedIn || $('login').hidden) showLogin('Signed out: sign in again.');
  });
  const match = location.hash.match(/(?:^#|&)token=([^&]*)/);
  if (match) {
    // The fragment never reaches the server; it leaves the address bar (and the history entry) here.
    history.replaceState(null, '', location.pathname + location.search);
    try {
      await signIn(decodeURIComponent(match[1]));
    } catch (err) {
      showLogin(`The link's token was refused: ${err.message}`);
      return;
    }
  }
  try {
    await api('GET', '/v1/runtime/info');
  } catch (err) {
    if (err.status === 401) showLogin();
    else showLogin(err.message);
    return;
  }
  await act(showApp);
}

$('login-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const token = $('login-token').value;
  act(async () => {
    try {
      await signIn(token);
    } catch (err) {
      $('login-error').textContent = err.status === 401 ? 'That token is wrong.' : err.message;
      return;
    }
    $('login-token').value = '';
    await showApp();
  });
});

$('sign-out').addEventListener('click', () => act(async () => {
  await api('DELETE', '/v1/auth/cookie');
  state.threadId = null;
  showLogin('Signed out.');
}));

// ---------------------------------------------------------------------------------------------- tabs

const TABS = [['threads-tab', 'threads-panel'], ['sessions-tab', 'sessions-panel'], ['runtime-tab', 'runtime-panel']];

function selectTab(tabId) {
  for (const [tab, panel] of TABS) {
    const on = tab === tabId;
    $(tab).setAttribute('aria-selected', String(on));
    $(panel).hidden = !on;
  }
  if (tabId === 'sessions-tab') act(refreshSessions);
  if (tabId === 'runtime-tab') act(refreshRuntime);
}

for (const [tab] of TABS) $(tab).addEventListener('click', () => selectTab(tab));

// ---------------------------------------------------------------------------------------------- threads

function threadLabel(thread) {
  return thread.title || `Thread ${thread.id.replace(/^thr_/, '').slice(0, 8)}`;
}

async function refreshThreads() {
  const archived = $('show-archived').checked ? '&archived_only=true' : '';
  const asked = ++state.threadsAsked;
  const threads = await api('GET', `/v1/threads?limit=200${archived}`);
  if (asked !== state.threadsAsked) return; // a later read is on its way (answers can overtake each other)
  state.threads = threads;
  // Redrawn only when something shown changed (a redraw every poll would throw a keyboard user's focus
  // back to the page every few seconds), and the focus then returns to the same thread's button.
  const drawn = JSON.stringify([archived, state.threadId, threads.map((t) => [t.id, t.title, t.updated_at])]);
  if (drawn === state.threadsDrawn) return;
  state.threadsDrawn = drawn;
  const focused = document.activeElement && document.activeElement.closest('[data-testid="thread-item"]');
  const list = $('thread-list');
  const items = state.threads.map((thread) => {
    const li = document.createElement('li');
    li.dataset.testid = 'thread-item';
    li.dataset.threadId = thread.id;
    li.dataset.updatedAt = thread.updated_at;
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'link';
    button.textContent = threadLabel(thread);
    if (thread.id === state.threadId) li.setAttribute('aria-current', 'true');
    button.addEventListener('click', () => act(() => openThread(thread.id)));
    const meta = document.createElement('small');
    meta.textContent = new Date(thread.updated_at).toLocaleString();
    li.append(button, meta);
    return li;
  });
  list.replaceChildren(...items);
  if (!items.length) {
    const li = document.createElement('li');
    li.className = 'muted';
    li.textContent = $('show-archived').checked ? 'No archived threads.' : 'No threads yet.';
    list.append(li);
  }
  if (focused) {
    const again = [...list.children].find((li) => li.dataset.threadId === focused.dataset.threadId);
    if (again) again.querySelector('button').focus();
  }
}

$('show-archived').addEventListener('change', () => act(refreshThreads));

$('new-thread').addEventListener('click', () => act(async () => {
  const thread = await api('POST', '/v1/threads', { body: {} });
  await refreshThreads();
  await openThread(thread.id);
  $('prompt-input').focus();
}));

// Also the connection state while no thread is open (no event stream to judge by): the server answered
// (live) or not (reconnecting); with a thread open, its stream decides.
setInterval(() => {
  if (!state.signedIn || document.visibilityState !== 'visible') return;
  refreshThreads().then(() => {
    if (!state.threadId) setConnection('live');
  }, (err) => {
    if (!state.threadId && err.status === 0) setConnection('reconnecting');
  });
}, THREAD_LIST_REFRESH_MS);

function showThreadHead(thread) {
  state.thread = thread;
  $('thread-head').hidden = false;
  $('thread-title').value = thread.title || '';
  $('archive-thread').textContent = thread.archived ? 'Unarchive' : 'Archive';
}

// The thread view asks for this many of the latest turns (the server's page limit); older ones come a page
// at a time with the "Earlier turns" button (the server pages GET /v1/threads/{id}, issue 16).
const DETAIL_TURNS = 1000;

function showOlder(page) {
  state.olderCursor = (page && page.next_before) || null;
  $('older-turns').hidden = !state.olderCursor;
}

$('older-turns').addEventListener('click', () => act(async () => {
  const threadId = state.threadId;
  if (!threadId || !state.olderCursor) return;
  const older = await api('GET', `/v1/threads/${q(threadId)}?turns_limit=${DETAIL_TURNS}&before=${q(state.olderCursor)}`);
  if (state.threadId !== threadId) return; // another thread was opened meanwhile
  transcript.prepend(older.turns, older.items);
  showOlder(older.page);
}));

// Shows a thread: its stored detail first, then its events after the detail's latest_seq (one snapshot on
// the server, so the hand-off has no gap and no overlap).
async function openThread(threadId) {
  const started = performance.now();
  closeStream();
  const detail = await api('GET', `/v1/threads/${q(threadId)}?turns_limit=${DETAIL_TURNS}`);
  performance.mark('thread-view-fetched', { detail: { threadId } });
  state.threadId = threadId;
  state.lastSeq = detail.latest_seq || 0;
  // A message being streamed is stored whole only when it ends: until then the detail has it empty. So a
  // thread with an unfinished turn replays its event log from the start, and of the events the detail
  // already covers it applies only that turn's (drawn afresh from them); the others are drawn already.
  const running = detail.turns.find((turn) => !FINISHED.has(turn.status));
  state.replay = null;
  if (running) {
    state.replay = { turnId: running.id, until: state.lastSeq };
    state.lastSeq = 0;
    detail.items = detail.items.filter((item) => item.turn_id !== running.id);
  }
  state.approvals.clear();
  $('approvals').replaceChildren();
  history.replaceState(null, '', `${location.pathname}${location.search}#/thread/${threadId}`);
  showThreadHead(detail.thread);
  $('empty').hidden = true;
  $('transcript').hidden = false;
  $('composer').hidden = false;
  $('session-saved').textContent = '';
  transcript.load(detail.turns, detail.items);
  showOlder(detail.page);
  updateTurnState();
  for (const li of $('thread-list').children) {
    if (li.dataset.threadId === threadId) li.setAttribute('aria-current', 'true');
    else li.removeAttribute('aria-current');
  }
  try {
    const pending = await api('GET', `/v1/threads/${q(threadId)}/approvals?status=pending`);
    for (const approval of pending.approvals) addApproval(approval);
  } catch (err) {
    if (err.status !== 404) throw err; // 404: a server without approvals
  }
  openStream();
  transcript.scrollToEnd();
  // "thread-view": from the click to the first frame after the transcript is laid out (make bench reads it).
  requestAnimationFrame(() => setTimeout(() => performance.measure('thread-view', {
    start: started, end: performance.now(), detail: { threadId, turns: detail.turns.length },
  })));
}

$('thread-title').addEventListener('change', () => act(async () => {
  if (!state.threadId) return;
  const title = $('thread-title').value.trim();
  if (!title) return;
  showThreadHead(await api('PATCH', `/v1/threads/${q(state.threadId)}`, { body: { title } }));
  await refreshThreads();
}));

$('archive-thread').addEventListener('click', () => act(async () => {
  if (!state.thread) return;
  showThreadHead(await api('PATCH', `/v1/threads/${q(state.threadId)}`, { body: { archived: !state.thread.archived } }));
  await refreshThreads();
}));

// ---------------------------------------------------------------------------------------------- events

function setConnection(text) {
  $('connection-status').textContent = text;
  $('connection-status').dataset.state = text;
}

function closeStream() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  if (state.source) {
    state.source.close();
    state.source = null;
  }
}

function openStream() {
  closeStream();
  const threadId = state.threadId;
  // since_seq names where this view is; on its own reconnects the browser also sends Last-Event-ID (the
  // last id it received) and the server starts after the larger of the two.
  const source = new EventSource(`/v1/threads/${q(threadId)}/events?since_seq=${state.lastSeq}`);
  state.source = source;
  source.onopen = () => {
    state.reconnectDelay = RECONNECT_FIRST_MS;
    setConnection('live');
  };
  source.onerror = () => {
    if (state.source !== source) return;
    setConnection('reconnecting');
    // CONNECTING: the browser retries by itself. CLOSED: it gave up (an error status, or a refused
    // connection): reopen from the last applied seq after a delay.
    if (source.readyState === EventSource.CLOSED) scheduleReconnect(threadId);
  };
  const handler = (event) => {
    if (state.source !== source) return;
    applyEvent(JSON.parse(event.data));
  };
  for (const name of EVENT_NAMES) source.addEventListener(name, handler);
}

function scheduleReconnect(threadId) {
  closeStream();
  const delay = state.reconnectDelay;
  state.reconnectDelay = Math.min(delay * 2, RECONNECT_CAP_MS);
  state.reconnectTimer = setTimeout(async () => {
    if (state.threadId !== threadId || !state.signedIn) return;
    try {
      await api('GET', '/v1/runtime/info'); // a 401 shows the sign-in form instead of retrying forever
    } catch (err) {
      if (err.status !== 401) scheduleReconnect(threadId);
      return;
    }
    if (state.threadId === threadId) openStream();
  }, delay);
}

function applyEvent(envelope) {
  if (envelope.thread_id !== state.threadId) return;
  if (envelope.seq <= state.lastSeq) return; // already applied (a replay after a reconnect)
  state.lastSeq = envelope.seq;
  if (state.replay && envelope.seq <= state.replay.until && envelope.turn_id !== state.replay.turnId) return;
  const p = envelope.payload || {};
  switch (envelope.event) {
    case 'thread.updated':
      if (p.thread) showThreadHead(p.thread);
      break;
    case 'thread.rewound':
    case 'thread.restored':
      if (p.removed_turn_ids) transcript.removeTurns(p.removed_turn_ids);
      else openThread(state.threadId).catch((err) => notice(err.message));
      break;
    case 'thread.deleted':
      closeStream();
      state.threadId = null;
      for (const id of ['thread-head', 'transcript', 'composer', 'older-turns']) $(id).hidden = true;
      $('approvals').replaceChildren();
      $('empty').hidden = false;
      history.replaceState(null, '', location.pathname + location.search);
      notice('This thread was deleted.');
      refreshThreads().catch(() => {});
      break;
    case 'turn.started':
      transcript.turnStarted(envelope.turn_id, p);
      break;
    case 'turn.interrupt_requested':
      transcript.setTurnStatus(envelope.turn_id, 'interrupting');
      break;
    case 'turn.completed':
      transcript.turnCompleted(envelope.turn_id, p);
      refreshThreads().catch(() => {});
      break;
    case 'item.started':
      transcript.itemStarted(envelope.turn_id, envelope.item_id, p);
      break;
    case 'item.delta':
      transcript.itemDelta(envelope.turn_id, envelope.item_id, p);
      break;
    case 'item.completed':
    case 'item.failed':
    case 'item.interrupted':
      transcript.itemEnded(envelope.turn_id, envelope.item_id, envelope.event.slice(5), p);
      break;
    case 'approval.requested':
      transcript.setTurnStatus(envelope.turn_id, 'awaiting_approval');
      transcript.setItemStatus(envelope.item_id, 'awaiting_approval');
      addApproval({ id: p.approval_id, turn_id: envelope.turn_id, tool: p.tool, input: p.input, expires_at: p.expires_at });
      break;
    case 'approval.resolved':
      removeApproval(p.approval_id);
      if (transcript.turnStatus(envelope.turn_id) === 'awaiting_approval') {
        transcript.setTurnStatus(envelope.turn_id, 'in_progress');
      }
      break;
    default:
      break;
  }
  updateTurnState();
}

// ---------------------------------------------------------------------------------------------- turns

function updateTurnState() {
  const latest = transcript.latestTurn();
  const status = latest ? latest.status : 'idle';
  $('turn-status').textContent = status;
  $('turn-status').dataset.status = status;
  const active = latest && !FINISHED.has(latest.status) ? latest : null;
  $('interrupt').disabled = !active;
  $('send').textContent = active ? 'Steer' : 'Send';
  const usage = transcript.totalUsage();
  $('usage').textContent = latest && latest.usage
    ? `last turn ${latest.usage.input_tokens} in / ${latest.usage.output_tokens} out · thread ${usage.input} in / ${usage.output} out tokens`
    : '';
}

function activeTurn() {
  const latest = transcript.latestTurn();
  return latest && !FINISHED.has(latest.status) ? latest : null;
}

async function send() {
  const input = $('prompt-input');
  const prompt = input.value;
  if (!prompt.trim() || !state.threadId) return;
  const active = activeTurn();
  if (active) {
    await api('POST', `/v1/threads/${q(state.threadId)}/turns/${q(active.id)}/steer`, { body: { prompt } });
  } else {
    const turn = await api('POST', `/v1/threads/${q(state.threadId)}/turns`, { body: { prompt } });
    transcript.ensureTurn(turn.id); // its events may have come first: they are newer than this answer
  }
  input.value = '';
  updateTurnState();
}

async function interrupt() {
  const active = activeTurn();
  if (!active) return;
  try {
    await api('POST', `/v1/threads/${q(state.threadId)}/turns/${q(active.id)}/interrupt`);
  } catch (err) {
    if (err.status !== 409) throw err; // it finished meanwhile: its turn.completed is on the way
  }
}

$('composer').addEventListener('submit', (event) => {
  event.preventDefault();
  act(send);
});

$('prompt-input').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    act(send);
  }
});

$('interrupt').addEventListener('click', () => act(interrupt));

document.addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && state.threadId && activeTurn()) {
    event.preventDefault();
    act(interrupt);
  }
});

async function forkAt(turnId) {
  const result = await api('POST', `/v1/threads/${q(state.threadId)}/fork`, { body: { through_turn_id: turnId } });
  await refreshThreads();
  await openThread(result.thread.id);
  notice(`Forked into a new thread through that turn (${result.turn_ids.length} turn(s) copied).`);
}

async function rewindTo(turnId) {
  const result = await api('POST', `/v1/threads/${q(state.threadId)}/rewind`, { body: { before_turn_id: turnId } });
  transcript.removeTurns(result.removed_turn_ids);
  updateTurnState();
}

async function retryTurn(turnId) {
  const turn = await api('POST', `/v1/threads/${q(state.threadId)}/retry`, { body: { turn_id: turnId } });
  transcript.removeTurns([turnId]);
  transcript.ensureTurn(turn.id);
  updateTurnState();
}

// ---------------------------------------------------------------------------------------------- approvals

function addApproval(approval) {
  if (!approval.id || state.approvals.has(approval.id)) return;
  const card = document.createElement('section');
  card.className = 'approval card';
  card.dataset.testid = 'approval-card';
  card.dataset.approvalId = approval.id;
  card.setAttribute('aria-label', `Approval for tool ${approval.tool}`);
  const title = document.createElement('h3');
  title.textContent = `Allow the tool ${approval.tool}?`;
  const input = document.createElement('pre');
  input.textContent = JSON.stringify(approval.input ?? {}, null, 2);
  const expiry = document.createElement('small');
  if (approval.expires_at) expiry.textContent = `Expires ${new Date(approval.expires_at).toLocaleTimeString()}`;
  const row = document.createElement('div');
  row.className = 'row';
  const decide = (decision) => act(async () => {
    try {
      await api('POST', `/v1/threads/${q(state.threadId)}/approvals/${q(approval.id)}`, { body: { decision } });
    } catch (err) {
      if (err.status !== 409) throw err; // already decided elsewhere (or expired): drop the card
    }
    removeApproval(approval.id);
  });
  for (const [decision, label, testid, cls] of [['allow', 'Allow', 'approval-allow', ''], ['deny', 'Deny', 'approval-deny', 'danger']]) {
    const button = document.createElement('button');
    button.type = 'button';
    button.textContent = label;
    button.dataset.testid = testid;
    if (cls) button.className = cls;
    button.addEventListener('click', () => decide(decision));
    row.append(button);
  }
  row.append(expiry);
  card.append(title, input, row);
  $('approvals').append(card);
  state.approvals.set(approval.id, card);
}

function removeApproval(approvalId) {
  const card = state.approvals.get(approvalId);
  if (card) card.remove();
  state.approvals.delete(approvalId);
}

// ---------------------------------------------------------------------------------------------- sessions

// Status -> what the person reads when a save did not happen (API.md, PUT /v1/sessions).
const SAVE_ERRORS = {
  412: 'Not saved: the session was changed elsewhere since this page saved it. Open the Sessions tab to see it, then save again to overwrite it.',
  409: 'Not saved: the session is busy with another save. Try again in a moment.',
  504: 'Not saved: the thread did not answer in time (nothing was written). Try again.',
  503: 'Not saved: the thread\'s engine is stopped (the server may be shutting down).',
};

$('save-session').addEventListener('click', () => act(async () => {
  if (!state.threadId) return;
  const sessionId = state.thread && state.thread.session_id;
  const body = { thread_id: state.threadId };
  const headers = {};
  if (sessionId) {
    body.session_id = sessionId;
    if (state.revisions.has(sessionId)) headers['If-Match'] = `"${state.revisions.get(sessionId)}"`;
  }
  $('session-saved').textContent = 'Saving…';
  let result;
  try {
    result = await api('PUT', '/v1/sessions', { body, headers });
  } catch (err) {
    if (err.status === 412 && sessionId) state.revisions.delete(sessionId); // the next save overwrites
    $('session-saved').textContent = SAVE_ERRORS[err.status] || `Not saved: ${err.message}`;
    return;
  }
  const meta = result.session.metadata;
  state.revisions.set(result.session_id, meta.revision);
  if (state.thread) state.thread.session_id = result.session_id;
  $('session-saved').textContent = `Saved: revision ${meta.revision}` + (result.turn_in_progress
    ? ' (a turn is running: saved as of the last finished turn)' : '');
  $('session-saved').dataset.revision = String(meta.revision);
}));

let searchTimer = null;
$('session-search').addEventListener('input', () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => act(refreshSessions), SEARCH_DEBOUNCE_MS);
});
$('session-sort').addEventListener('change', () => act(refreshSessions));
$('sessions-archived').addEventListener('change', () => act(refreshSessions));

async function refreshSessions() {
  const params = new URLSearchParams({ limit: '200', sort: $('session-sort').value });
  const search = $('session-search').value.trim();
  if (search) params.set('search', search);
  if ($('sessions-archived').checked) params.set('archived_only', 'true');
  const asked = ++state.sessionsAsked;
  const { sessions } = await api('GET', `/v1/sessions?${params}`);
  if (asked !== state.sessionsAsked) return; // a later search was sent: its answer is the one to show
  const list = $('session-list');
  list.replaceChildren(...sessions.map(sessionItem));
  list.dataset.query = search; // what the list on screen answers (tests wait on it)
  if (!sessions.length) {
    const li = document.createElement('li');
    li.className = 'muted';
    li.textContent = search ? `No session matches “${search}”.` : 'No saved sessions.';
    list.append(li);
  }
}

function smallButton(label, testid, onClick, cls = 'quiet') {
  const button = document.createElement('button');
  button.type = 'button';
  button.className = cls;
  button.textContent = label;
  if (testid) button.dataset.testid = testid;
  button.addEventListener('click', onClick);
  return button;
}

function sessionItem(meta) {
  state.revisions.set(meta.id, meta.revision);
  const li = document.createElement('li');
  li.dataset.testid = 'session-item';
  li.dataset.sessionId = meta.id;
  const title = document.createElement('strong');
  title.textContent = meta.title || meta.id;
  const info = document.createElement('small');
  info.textContent = `revision ${meta.revision} · ${meta.message_count} messages · ${meta.total_tokens} tokens · `
    + new Date(meta.updated_at).toLocaleString();
  const row = document.createElement('div');
  row.className = 'row wrap';
  const patch = async (body) => {
    const result = await api('PATCH', `/v1/sessions/${q(meta.id)}`, { body });
    state.revisions.set(meta.id, result.session.revision ?? result.session.metadata?.revision);
    await refreshSessions();
  };
  row.append(
    smallButton('Resume', 'session-resume', () => act(async () => {
      const result = await api('POST', `/v1/sessions/${q(meta.id)}/resume-thread`, { body: {} });
      selectTab('threads-tab');
      await refreshThreads();
      await openThread(result.thread_id);
      notice(`Resumed “${meta.title}” into a new thread (${result.message_count} messages).`);
    }), ''),
    smallButton('Rename', null, () => {
      const input = document.createElement('input');
      input.value = meta.title || '';
      input.setAttribute('aria-label', 'New session title');
      const save = smallButton('Save title', null, () => act(() => patch({ title: input.value.trim() })), '');
      title.replaceWith(input);
      row.prepend(save);
      input.focus();
      input.addEventListener('keydown', (event) => {
        if (event.key === 'Enter') save.click();
      });
    }),
    smallButton(meta.archived ? 'Unarchive' : 'Archive', null, () => act(() => patch({ archived: !meta.archived }))),
    smallButton('Delete', null, (event) => {
      const button = event.currentTarget;
      if (button.dataset.armed !== 'true') {
        button.dataset.armed = 'true';
        button.textContent = 'Confirm delete';
        return;
      }
      act(async () => {
        await api('DELETE', `/v1/sessions/${q(meta.id)}`);
        await refreshSessions();
      });
    }, 'quiet danger'),
  );
  li.append(title, info, row);
  return li;
}

// ---------------------------------------------------------------------------------------------- runtime

function fact(list, name, value) {
  const dt = document.createElement('dt');
  dt.textContent = name;
  const dd = document.createElement('dd');
  dd.textContent = value;
  list.append(dt, dd);
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const parts = [[Math.floor(s / 86400), 'd'], [Math.floor(s / 3600) % 24, 'h'], [Math.floor(s / 60) % 60, 'm'], [s % 60, 's']];
  return parts.filter(([n], i) => n || i === 3).map(([n, u]) => `${n}${u}`).join(' ');
}

// One MCP server of the Runtime panel: name, status (a hook for tests: data-status), the error of a failed
// one, and a Reconnect button (POST …/reconnect answers once the server is ready or has failed again).
function mcpServerItem(server) {
  const li = document.createElement('li');
  li.dataset.testid = 'mcp-server';
  li.dataset.name = server.name;
  li.dataset.status = server.status;
  const head = document.createElement('div');
  head.className = 'row wrap';
  const name = document.createElement('strong');
  name.textContent = server.name;
  const status = document.createElement('span');
  status.dataset.testid = 'mcp-server-status';
  status.className = `mcp-status ${server.status}`;
  status.textContent = server.status;
  const info = document.createElement('small');
  info.textContent = `${server.transport} · ${server.tools_count} tools`;
  head.append(name, status, info);
  li.append(head);
  if (server.enabled) {
    head.append(smallButton('Reconnect', 'mcp-reconnect', (event) => act(async () => {
      event.target.disabled = true;
      try {
        await api('POST', `/v1/mcp/servers/${q(server.name)}/reconnect`);
      } finally {
        await refreshRuntime();
      }
    })));
  }
  if (server.error) {
    const error = document.createElement('small');
    error.dataset.testid = 'mcp-server-error';
    error.className = 'error';
    error.textContent = server.error;
    li.append(error);
  }
  return li;
}

async function refreshRuntime() {
  const info = await api('GET', '/v1/runtime/info');
  const facts = $('runtime-info');
  facts.replaceChildren();
  fact(facts, 'Version', info.version);
  fact(facts, 'Model backend', info.model_backend);
  fact(facts, 'Live engines', String(info.live_engines));
  fact(facts, 'Uptime', duration(info.uptime_seconds));
  if (info.store) fact(facts, 'Store', info.store);
  if (info.host_id) fact(facts, 'Host', info.host_id);
  const servers = $('mcp-servers');
  const tools = $('mcp-tools');
  try {
    const [s, t] = await Promise.all([api('GET', '/v1/mcp/servers'), api('GET', '/v1/mcp/tools')]);
    servers.replaceChildren(...s.servers.map(mcpServerItem));
    tools.replaceChildren(...t.tools.map((tool) => {
      const li = document.createElement('li');
      li.dataset.testid = 'mcp-tool';
      li.dataset.name = tool.name;
      li.dataset.server = tool.server;
      const name = document.createElement('code');
      name.textContent = tool.name;
      const about = document.createElement('small');
      about.textContent = `${tool.read_only ? 'read-only · ' : ''}${tool.description || ''}`;
      li.append(name, about);
      return li;
    }));
    if (!s.servers.length) servers.textContent = 'No MCP servers configured.';
    if (!t.tools.length) tools.textContent = 'No MCP tools.';
  } catch (err) {
    if (err.status !== 404) throw err;
    servers.textContent = 'This server has no MCP support.';
  }
}

$('runtime-refresh').addEventListener('click', () => act(refreshRuntime));

boot();
