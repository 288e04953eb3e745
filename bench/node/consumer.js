// The Node.js row of the broker benchmark (bench/src/broker.rs): a consumer
// written the way services commonly write one with amqplib. Each event is
// parsed, handed to a handler, its output published persistent on a confirm
// channel, and the input acknowledged once the broker has confirmed the output.
// Up to `prefetch` events are in flight at once, as amqplib delivers them.
//
//   node consumer.js --url amqp://guest:guest@127.0.0.1:5672/vhost \
//                    --queue bench.input --prefetch 100
//
// Runs until killed.
'use strict';

const amqp = require('amqplib');

const OUTPUT_EXCHANGE = 'bench.out';

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  if (at === -1 || at + 1 >= process.argv.length) {
    if (fallback === undefined) {
      throw new Error(`missing --${name}`);
    }
    return fallback;
  }
  return process.argv[at + 1];
}

// The "business logic": one small event out per event in, like Switchboard's
// passthrough plugin in the same benchmark.
function handle(event) {
  return {
    id: `${event.id}:0`,
    type: 'emitted.0',
    source: 'passthrough',
    causation_id: event.id,
    correlation_id: event.correlation_id || event.id,
    tenant_id: event.tenant_id,
    timestamp: new Date().toISOString(),
    data: { i: 0 },
  };
}

async function main() {
  const url = option('url');
  const queue = option('queue');
  const prefetch = Number(option('prefetch', '100'));

  const connection = await amqp.connect(url);
  connection.on('error', (err) => {
    console.error('connection error:', err.message);
    process.exit(1);
  });
  const channel = await connection.createConfirmChannel();
  channel.on('error', (err) => {
    console.error('channel error:', err.message);
    process.exit(1);
  });
  await channel.prefetch(prefetch);

  await channel.consume(queue, (message) => {
    if (message === null) {
      console.error('consumer cancelled by the broker');
      process.exit(1);
    }
    let output;
    try {
      output = handle(JSON.parse(message.content.toString('utf8')));
    } catch (err) {
      console.error('rejecting a message that is not JSON:', err.message);
      channel.nack(message, false, false);
      return;
    }
    channel.publish(
      OUTPUT_EXCHANGE,
      output.type,
      Buffer.from(JSON.stringify(output)),
      {
        persistent: true,
        contentType: 'application/json',
        messageId: output.id,
        correlationId: output.correlation_id,
      },
      (err) => {
        if (err) {
          channel.nack(message, false, true);
        } else {
          channel.ack(message);
        }
      },
    );
  });

  const stop = () => connection.close().finally(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
