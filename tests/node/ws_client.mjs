// A WebSocket client nobody on the project wrote (the `ws` package), driven line by line by
// tests/integration/test_events.py: commands come in on stdin as JSON lines, everything that
// happens goes out on stdout as JSON lines. One process holds any number of connections, each
// named by the test.
//
// Commands:
//   {"op":"open","id":"a","url":"ws://...","key":"thk_...","protocols":["p"]}
//   {"op":"send","id":"a","data":"text"}            a text frame
//   {"op":"send","id":"a","data":"text","binary":true}
//   {"op":"pause","id":"a"} / {"op":"resume","id":"a"}  stop / start reading the socket
//   {"op":"close","id":"a","code":1000}  {"op":"terminate","id":"a"}  {"op":"exit"}
// Events:
//   {"event":"ready"}
//   {"id":"a","event":"open","protocol":"p"}
//   {"id":"a","event":"message","data":"..."}
//   {"id":"a","event":"unexpected","status":401,"body":"..."}
//   {"id":"a","event":"close","code":1001,"reason":"..."}
//   {"id":"a","event":"error","message":"..."}
import readline from 'node:readline';
import WebSocket from 'ws';

const sockets = new Map();

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

function open(cmd) {
  const headers = {};
  if (cmd.key) headers.Authorization = `Bearer ${cmd.key}`;
  const ws = new WebSocket(cmd.url, cmd.protocols || [], { headers, handshakeTimeout: 10000 });
  sockets.set(cmd.id, ws);
  ws.on('open', () => emit({ id: cmd.id, event: 'open', protocol: ws.protocol }));
  ws.on('message', (data, isBinary) => {
    emit({ id: cmd.id, event: 'message', binary: isBinary, data: data.toString() });
  });
  ws.on('unexpected-response', (req, res) => {
    let body = '';
    res.on('data', (chunk) => { body += chunk; });
    res.on('end', () => {
      emit({ id: cmd.id, event: 'unexpected', status: res.statusCode, body });
      req.destroy();
    });
  });
  ws.on('close', (code, reason) => {
    emit({ id: cmd.id, event: 'close', code, reason: reason.toString() });
  });
  ws.on('error', (err) => emit({ id: cmd.id, event: 'error', message: err.message }));
}

const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  const cmd = JSON.parse(line);
  const ws = sockets.get(cmd.id);
  switch (cmd.op) {
    case 'open':
      open(cmd);
      break;
    case 'send':
      ws.send(cmd.binary ? Buffer.from(cmd.data) : cmd.data);
      break;
    case 'pause':
      ws._socket.pause();
      break;
    case 'resume':
      ws._socket.resume();
      break;
    case 'close':
      ws.close(cmd.code || 1000, cmd.reason || '');
      break;
    case 'terminate':
      ws.terminate();
      break;
    case 'exit':
      process.exit(0);
      break;
    default:
      emit({ event: 'error', message: `unknown op ${cmd.op}` });
  }
});
lines.on('close', () => process.exit(0));
emit({ event: 'ready' });
