// Publishes the foreign-client message set with amqplib (tests/foreign_clients.rs).
//
// Usage: node publish_amqplib.js AMQP_URL EXCHANGE ROUTING_KEY CONTROL_QUEUE
//
// Each message goes twice, with publisher confirms: to EXCHANGE/ROUTING_KEY
// (through the flowgate stage under test) and to CONTROL_QUEUE through the
// default exchange, so the test can compare the forwarded copy with the
// broker's untouched one.
'use strict';
const amqp = require('amqplib');

const [url, exchange, routingKey, control] = process.argv.slice(2);

// Every AMQP 0-9-1 field type as RabbitMQ speaks it:
// t b B s u I i l f d D T S A F V x.
const everyType = {
  bool: true,
  int8: { '!': 'int8', value: -8 },
  uint8: { '!': 'uint8', value: 200 },
  int16: { '!': 'int16', value: -300 },
  uint16: { '!': 'uint16', value: 60000 },
  int32: { '!': 'int32', value: -70000 },
  uint32: { '!': 'uint32', value: 4000000000 },
  int64: { '!': 'int64', value: -(2 ** 40) },
  float: { '!': 'float', value: 1.5 },
  double: { '!': 'double', value: -2.25e-10 },
  decimal: { '!': 'decimal', value: { places: 3, digits: 12345 } },
  timestamp: { '!': 'timestamp', value: 1700000000 },
  longstr: 'text ✓',
  array: [1, 'two', null, { '!': 'float', value: 0.5 }, [], {}],
  table: { inner: { '!': 'int16', value: 7 } },
  void: null,
  bytes: Buffer.from([0, 1, 2, 254, 255]),
};
const headers = Object.assign({}, everyType, {
  nested: Object.assign({}, everyType, { deeper: { again: everyType } }),
  'ключ ✓': 'unicode key',
  'empty-str': '',
});

const all = Buffer.alloc(256);
for (let i = 0; i < 256; i++) all[i] = i;

const messages = [
  [
    Buffer.from('amqplib-0 ✓'),
    {
      contentType: 'application/x-test; charset=utf-8',
      contentEncoding: 'identity',
      headers,
      deliveryMode: 1,
      priority: 7,
      correlationId: 'amqplib-corr',
      replyTo: 'amqplib.reply',
      expiration: '600000',
      messageId: 'amqplib-all-properties',
      timestamp: 1700000000,
      type: 'amqplib.type',
      userId: 'guest',
      appId: 'amqplib-app',
      // (amqplib never sends cluster-id; pika's message covers it.)
    },
  ],
  // No properties at all: no delivery mode, no id (matched by body).
  [Buffer.from('amqplib-1 no properties'), {}],
  [
    Buffer.concat([Buffer.from('amqplib-2 '), all]),
    { deliveryMode: 2, messageId: 'amqplib-persistent-binary' },
  ],
  [Buffer.alloc(0), { deliveryMode: 1, messageId: 'amqplib-empty-body' }],
];

async function main() {
  const conn = await amqp.connect(url);
  const ch = await conn.createConfirmChannel();
  let returned = 0;
  ch.on('return', () => {
    returned += 1;
  });
  for (const [body, props] of messages) {
    ch.publish(exchange, routingKey, body, Object.assign({ mandatory: true }, props));
    ch.publish('', control, body, Object.assign({ mandatory: true }, props));
  }
  await ch.waitForConfirms();
  await conn.close();
  if (returned > 0) throw new Error(`${returned} messages returned unroutable`);
  console.log(messages.length);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
