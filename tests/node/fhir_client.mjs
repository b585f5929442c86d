// A FHIR client nobody on the project wrote (fhir-kit-client) creates a QuestionnaireResponse on
// trialhub, reads it back, and searches, following the server's next links. Run by tests/integration/test_fhir_client.py, which starts the
// server and passes TRIALHUB_BASE, TRIALHUB_KEY and the resource (JSON) in TRIALHUB_QR.
import { CapabilityTool, Client } from 'fhir-kit-client';
import assert from 'node:assert/strict';

const client = new Client({
  baseUrl: `${process.env.TRIALHUB_BASE}/fhir`,
  customHeaders: { Authorization: `Bearer ${process.env.TRIALHUB_KEY}` },
});
const qr = JSON.parse(process.env.TRIALHUB_QR);

const capability = await client.capabilityStatement();
assert.equal(capability.resourceType, 'CapabilityStatement');
assert.equal(capability.fhirVersion, '4.0.1');

const created = await client.create({
  resourceType: 'QuestionnaireResponse',
  body: qr,
  options: { headers: { Prefer: 'return=representation' } },
});
assert.equal(created.resourceType, 'QuestionnaireResponse');
const { response } = Client.httpFor(created);
assert.equal(response.status, 201);
const location = response.headers.get('location');
assert.match(location, /^\/fhir\/QuestionnaireResponse\/\d+$/);
const id = location.split('/').pop();

// Read it back until scoring is done.
let read;
for (let i = 0; i < 100; i++) {
  read = await client.read({ resourceType: 'QuestionnaireResponse', id });
  const processing = read.extension.find(
    (e) => e.url === 'https://trialhub.dev/fhir/StructureDefinition/processing');
  if (processing.extension.find((e) => e.url === 'status').valueCode === 'scored') break;
  await new Promise((r) => setTimeout(r, 50));
}
assert.equal(read.id, id);
assert.deepEqual(read.item, qr.item);
const processing = read.extension.find(
  (e) => e.url === 'https://trialhub.dev/fhir/StructureDefinition/processing');
const sub = Object.fromEntries(processing.extension.map((e) => [e.url, e]));
assert.equal(sub.status.valueCode, 'scored');
assert.equal(sub.score.valueInteger, 9);
assert.equal(sub.band.valueString, 'mild');

// A bad one comes back as an OperationOutcome the client can read.
await assert.rejects(
  client.create({ resourceType: 'QuestionnaireResponse', body: { ...qr, status: 'nonsense' } }),
  (err) => err.response.status === 422 && err.response.data.resourceType === 'OperationOutcome');

// Search: what the CapabilityStatement advertises, then every page by the client's nextPage().
const tool = new CapabilityTool(capability);
assert.ok(tool.resourceCan('QuestionnaireResponse', 'search-type'));
for (const param of ['_lastUpdated', 'subject', 'questionnaire']) {
  assert.ok(tool.resourceSearch('QuestionnaireResponse', param), param);
}
const second = await client.create({
  resourceType: 'QuestionnaireResponse',
  body: { ...qr, identifier: { ...qr.identifier, value: `${qr.identifier.value}-2` } },
});
const secondId = Client.httpFor(second).response.headers.get('location').split('/').pop();
const searchParams = {
  subject: qr.subject.reference,
  questionnaire: qr.questionnaire,
  _lastUpdated: 'ge2020-01-01',
  _count: 1,
};
let page = await client.search({ resourceType: 'QuestionnaireResponse', searchParams });
assert.equal(page.resourceType, 'Bundle');
assert.equal(page.type, 'searchset');
assert.equal(page.total, 2);
const found = [];
let pages = 0;
while (page) {
  pages++;
  found.push(...page.entry.map((e) => e.resource.id));
  page = await client.nextPage({ bundle: page });
}
assert.equal(pages, 2);
assert.deepEqual(found, [id, secondId]);

// An unknown parameter is refused with an OperationOutcome.
await assert.rejects(
  client.search({ resourceType: 'QuestionnaireResponse', searchParams: { _sort: 'authored' } }),
  (err) => err.response.status === 400 && err.response.data.resourceType === 'OperationOutcome');

console.log(`fhir-kit-client: created and read QuestionnaireResponse/${id}, searched ${pages} pages`);
