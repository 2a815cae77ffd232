// The terminal page: xterm.js on `WS /sandboxes/{id}/pty`. The credential comes in the URL's
// fragment (`#token=…`, never sent to a server), is removed from the address bar at once and
// kept for this tab only (sessionStorage), with the session id: a dropped connection
// re-attaches and replays what this page missed (the bytes received are counted in memory),
// a reload re-attaches and replays what the session still keeps onto the fresh screen.
(function () {
  "use strict";
  const match = location.pathname.match(/^\/ui\/sandboxes\/([^/]+)\/terminal\/?$/);
  const status = document.getElementById("status");
  if (!match) {
    status.textContent = "no sandbox in this URL";
    return;
  }
  const id = decodeURIComponent(match[1]);
  const store = window.sessionStorage;
  const key = (name) => "sandgate." + id + "." + name;
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("token")) {
    store.setItem(key("token"), fragment.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  const token = store.getItem(key("token"));
  let session = store.getItem(key("session"));
  let received = 0;
  let ws = null;
  let ended = false;

  const term = new Terminal({ cursorBlink: true, scrollback: 5000 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  // For scripts driving the page (tests, automation): the terminal and its buffer.
  window.sandgateTerminal = term;
  fit.fit();
  window.addEventListener("resize", () => fit.fit());
  const encoder = new TextEncoder();
  term.onData((data) => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(data));
  });
  term.onResize(({ cols, rows }) => {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "resize", cols, rows }));
    }
  });

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let url = `${scheme}//${location.host}/sandboxes/${encodeURIComponent(id)}/pty` +
      `?cols=${term.cols}&rows=${term.rows}`;
    if (session) url += `&session=${encodeURIComponent(session)}&since=${received}`;
    const protocols = ["sandgate.v1"];
    if (token) protocols.push("sandgate.auth." + token);
    ws = new WebSocket(url, protocols);
    ws.binaryType = "arraybuffer";
    let opened = false;
    ws.onopen = () => { opened = true; status.textContent = "connected"; term.focus(); };
    ws.onmessage = (event) => {
      if (typeof event.data === "string") {
        const msg = JSON.parse(event.data);
        if (msg.type === "hello") {
          session = msg.session;
          received = msg.offset;
          store.setItem(key("session"), session);
        } else if (msg.type === "exit") {
          ended = true;
          store.removeItem(key("session"));
          status.textContent = "exited" + (msg.exit_code === null ? "" : " with " + msg.exit_code);
        } else if (msg.type === "replay_truncated") {
          term.write("\r\n[sandgate: earlier output is no longer kept]\r\n");
        }
        return;
      }
      const bytes = new Uint8Array(event.data);
      received += bytes.length;
      term.write(bytes);
    };
    ws.onclose = (event) => {
      if (ended) return;
      if (event.code === 4001) {
        status.textContent = "opened elsewhere";
        return;
      }
      if (event.code === 4400 || (!opened && session)) {
        // The session is gone (or no longer has what this tab counted): start a new one.
        session = null;
        received = 0;
        store.removeItem(key("session"));
      }
      status.textContent = "disconnected; reconnecting…";
      setTimeout(connect, 1000);
    };
  }
  connect();
})();
