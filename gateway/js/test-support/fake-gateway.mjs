// A scripted gateway behind a fake WebSocket constructor (passed as `options.WebSocket`), for
// protocol cases a real gateway does not produce on demand: a reset after a 4008, a socket lost
// halfway through a snapshot, an answer lost with its socket.

import { waitFor } from './processes.mjs';

export function fakeGateway() {
  const sockets = [];

  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.readyState = 0;
      sockets.push(this);
      setTimeout(() => {
        if (this.readyState !== 0) return;
        this.readyState = 1;
        this.onopen?.({});
      }, 0);
    }

    send(text) {
      if (this.readyState !== 1) throw new Error('not open');
      this.sent.push(JSON.parse(text));
    }

    close(code = 1005, reason = '') {
      if (this.readyState >= 2) return;
      this.readyState = 3;
      setTimeout(() => this.onclose?.({ code, reason }), 0);
    }

    // --- the gateway's side ---

    /** Delivers `frame` to the client. */
    frame(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }

    /** The gateway closes the socket with `code`. */
    drop(code, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }

    /** The first frame from the client that `predicate` accepts (waited for). */
    received(predicate) {
      return waitFor(() => this.sent.find(predicate), 'a frame from the client', 2_000);
    }
  }

  return {
    WebSocket: FakeWebSocket,
    sockets,
    /** The `index`-th socket the client opened, once open. */
    socket: (index) =>
      waitFor(() => sockets[index]?.readyState === 1 && sockets[index], `socket ${index}`, 2_000),
  };
}
