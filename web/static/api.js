// The one place the dashboard talks HTTP: JSON in and out, the cookie sent by the browser, errors thrown
// as ApiError with the server's {error: {status, code, message}} body. A 401 on a cookie request calls the
// handler the app registers (it shows the sign-in form).

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let unauthorized = () => {};

export function onUnauthorized(handler) {
  unauthorized = handler;
}

// method, path: the request; body: a value sent as JSON; headers: extra headers; bearer: a token sent as
// Authorization (only the sign-in exchange does that: every other request rides on the cookie).
export async function api(method, path, { body, headers = {}, bearer } = {}) {
  const sent = { Accept: 'application/json', ...headers };
  if (body !== undefined) sent['Content-Type'] = 'application/json';
  if (bearer) sent.Authorization = `Bearer ${bearer}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: sent,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'same-origin',
      cache: 'no-store',
    });
  } catch (err) {
    throw new ApiError(0, 'unreachable', `The server did not answer (${method} ${path}): ${err.message}`);
  }
  const text = response.status === 204 ? '' : await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const error = (data && data.error) || {
      status: response.status, code: 'http_error', message: text.slice(0, 200) || response.statusText,
    };
    if (response.status === 401 && !bearer) unauthorized();
    throw new ApiError(response.status, error.code, error.message);
  }
  return data;
}

export const q = encodeURIComponent;
