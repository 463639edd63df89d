/*
 * fluidos_retain: a mosquitto 2 plugin that bounds what the domain broker keeps retained.
 *
 * The domain ACL (broker-config/acl) says where a node may write, but an ACL cannot look at
 * the retain flag or the size: a node allowed to write `to/+/from/{me}` could park any
 * number of retained messages there (nobody reads them, only it can clear them, and the
 * broker keeps them in memory and in mosquitto.db). This plugin sees every publish in the
 * ACL check (MOSQ_EVT_ACL_CHECK carries `retain` and `payloadlen`) and refuses:
 *
 *   - a retained publish with a payload on any topic other than the publisher's own catalog
 *     entry, `fluidos/v1/{domain}/catalog/{username}` (the username is the certificate's CN);
 *   - any publish on that catalog entry whose payload is larger than `max_catalog_bytes`.
 *
 * A site broker's bridge (domain.sh site; username `bridge:{site}`, a CN no node id can have,
 * since node ids never contain ':') forwards every advert of its site's nodes, so for it the
 * first rule reads: a retained publish with a payload only on `catalog/{id}` where {id} is a
 * valid node id (A-Z a-z 0-9 . _ -, at most 48 bytes, one topic level), and the size bound
 * holds on every catalog entry. A bridge can thus park at most one bounded entry per node id
 * (docs/security.md, "Site brokers").
 *
 * A supernode (domain.sh supernode; username `supernode:{name}`, another CN no node id can
 * have) trades on behalf of FLUIDOS reference nodes, each a buyer `ref-{hash}` of its own
 * (docs/supernode.md). Its ACL entry grants it `to/+/from/+` both ways, which this plugin
 * narrows: it may write addressed mail only as a `ref-` buyer (`to/{node}/from/ref-...`) and
 * have delivered only mail addressed to one (`to/ref-.../from/{node}`), never anything a
 * fluidlet node sends or receives (domain.sh never enrols a node id starting with `ref-`).
 *
 * An empty retained payload stores nothing (it deletes), so it is left to the ACL: the last
 * will that clears a catalog entry, and a node cleaning up, keep working. Everything this
 * plugin does not refuse is deferred to the ACL file, which decides as before (a plugin
 * callback that returned "allowed" would bypass the ACL file).
 *
 * Revocation (docs/security.md, "Revoking a node"). The broker's `crlfile` refuses a revoked
 * certificate at the handshake, but mosquitto does not re-check the sessions already open when
 * it re-reads the CRL on SIGHUP (mosquitto_security_apply_default only re-reads each live
 * session's CN). So the plugin reads the revoked node ids (`plugin_opt_revoked FILE`, one per
 * line, written by `domain.sh revoke`) at start and on every SIGHUP (MOSQ_EVT_RELOAD), and on
 * the next tick, for each id new since the last read: kicks its sessions with their will (a
 * fluidlet node's will clears its advert), publishes an empty retained message on its catalog
 * entry (a client without a will is cleared too), and from then on refuses a revoked username
 * every read, write and subscription, and a bridge a retained advert for a revoked id.
 *
 * Options (mosquitto.conf, after `plugin PATH`):
 *   plugin_opt_domain NAME               the domain (required)
 *   plugin_opt_max_catalog_bytes N       largest catalog payload, default 16384 (the
 *                                        protocol's MAX_PAYLOAD, docs/protocol.md section 1)
 *   plugin_opt_revoked FILE              revoked node ids, one per line (optional; at most
 *                                        MAX_REVOKED); missing at start is an error, unreadable
 *                                        at a reload keeps the list read before
 *
 * Build (Debian: apt-get install gcc mosquitto-dev; domain.sh init does this):
 *   gcc -shared -fPIC -O2 -Wall -Wextra -o fluidos_retain.so fluidos_retain.c
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define DEFAULT_MAX_CATALOG_BYTES 16384u
#define MAX_DOMAIN 48
#define MAX_NODE_ID 48
#define BRIDGE_PREFIX "bridge:"
#define SUPERNODE_PREFIX "supernode:"
#define REF_PREFIX "ref-"
/* Revoked ids kept: 100,000 x 49 bytes, under 5 MB; a longer list is refused. */
#define MAX_REVOKED 100000

struct revoked {
	char (*ids)[MAX_NODE_ID + 1];	/* sorted, for bsearch */
	size_t count;
};

struct config {
	char prefix[sizeof("fluidos/v1/") + MAX_DOMAIN + sizeof("/catalog/")];
	size_t prefix_len;
	char to_prefix[sizeof("fluidos/v1/") + MAX_DOMAIN + sizeof("/to/")];
	size_t to_prefix_len;
	uint32_t max_catalog_bytes;
	unsigned long refused;
	char *revoked_path;
	struct revoked revoked;
	/* Ids revoked since the previous read, cut off at the next tick. */
	struct revoked pending;
};

static mosquitto_plugin_id_t *plugin_id;
static struct config cfg;

/* Logs the first refusal and then one in every 1000: a flooding node must not flood the log. */
static void refused(const char *what, const char *user, const char *topic, uint32_t len)
{
	if(cfg.refused++ % 1000 == 0){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				"fluidos_retain: refused %s from %s on %s (%u bytes); %lu refusals so far",
				what, user ? user : "(no username)", topic, (unsigned)len, cfg.refused);
	}
}

/* A node id: 1..MAX_NODE_ID bytes of A-Z a-z 0-9 . _ - (so one whole topic level). */
static bool valid_node_id(const char *id)
{
	size_t n = 0;
	for(; id[n]; n++){
		char c = id[n];
		bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
			|| c == '.' || c == '_' || c == '-';
		if(!ok || n >= MAX_NODE_ID){
			return false;
		}
	}
	return n > 0;
}

/* A reference node's buyer id: a node id that starts with "ref-" and has more after it. */
static bool ref_id(const char *id)
{
	return strncmp(id, REF_PREFIX, strlen(REF_PREFIX)) == 0 && id[strlen(REF_PREFIX)] != '\0'
		&& valid_node_id(id);
}

/* The recipient and sender levels of `{to_prefix}{to}/from/{from}`, copied into `to` and
 * `from` (MAX_NODE_ID + 1 bytes each); false for any other topic. */
static bool addressed(const char *topic, char *to, char *from)
{
	const char *rest, *slash;
	size_t n;
	if(strncmp(topic, cfg.to_prefix, cfg.to_prefix_len) != 0){
		return false;
	}
	rest = topic + cfg.to_prefix_len;
	slash = strchr(rest, '/');
	if(slash == NULL || (n = (size_t)(slash - rest)) == 0 || n > MAX_NODE_ID){
		return false;
	}
	memcpy(to, rest, n);
	to[n] = '\0';
	if(strncmp(slash, "/from/", 6) != 0){
		return false;
	}
	rest = slash + 6;
	n = strlen(rest);
	if(n == 0 || n > MAX_NODE_ID || strchr(rest, '/') != NULL){
		return false;
	}
	memcpy(from, rest, n + 1);
	return valid_node_id(to) && valid_node_id(from);
}

/* A supernode's mail: only as a ref- buyer, only to a ref- buyer. MOSQ_ERR_ACL_DENIED or
 * MOSQ_ERR_PLUGIN_DEFER (the ACL file then decides, as for everyone). */
static int supernode_check(const struct mosquitto_evt_acl_check *ed, const char *user)
{
	char to[MAX_NODE_ID + 1], from[MAX_NODE_ID + 1];
	if(ed->topic == NULL || strncmp(ed->topic, cfg.to_prefix, cfg.to_prefix_len) != 0){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	if(!addressed(ed->topic, to, from)){
		refused("a supernode's malformed mail topic", user, ed->topic, ed->payloadlen);
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access == MOSQ_ACL_WRITE && !ref_id(from)){
		refused("a supernode's mail not from a ref- buyer", user, ed->topic, ed->payloadlen);
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access == MOSQ_ACL_READ && !ref_id(to)){
		/* Delivery-time check: mail for a fluidlet node never reaches a supernode. */
		return MOSQ_ERR_ACL_DENIED;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int compare_ids(const void *a, const void *b)
{
	return strcmp((const char *)a, (const char *)b);
}

static bool is_revoked(const struct revoked *r, const char *id)
{
	return r->count > 0 && strlen(id) <= MAX_NODE_ID
		&& bsearch(id, r->ids, r->count, sizeof(r->ids[0]), compare_ids) != NULL;
}

/* Reads the revoked ids from cfg.revoked_path into *out (sorted). A line that is not a node id
 * is skipped with a warning. Returns false (and leaves *out empty) if the file cannot be read
 * or holds more than MAX_REVOKED ids. */
static bool read_revoked(struct revoked *out)
{
	FILE *f;
	char line[MAX_NODE_ID + 3];
	size_t cap = 64;
	bool skipping = false;

	out->ids = NULL;
	out->count = 0;
	f = fopen(cfg.revoked_path, "r");
	if(f == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "fluidos_retain: cannot read the revoked list %s",
				cfg.revoked_path);
		return false;
	}
	out->ids = malloc(cap * sizeof(out->ids[0]));
	if(out->ids == NULL){
		fclose(f);
		return false;
	}
	while(fgets(line, sizeof(line), f) != NULL){
		size_t n = strlen(line);
		bool whole = n > 0 && line[n - 1] == '\n';
		if(skipping){
			/* The rest of an over-long line. */
			skipping = !whole;
			continue;
		}
		if(whole){
			line[--n] = '\0';
		}else if(!feof(f)){
			mosquitto_log_printf(MOSQ_LOG_WARNING,
					"fluidos_retain: %s: a line longer than a node id, skipped", cfg.revoked_path);
			skipping = true;
			continue;
		}
		if(n == 0){
			continue;
		}
		if(!valid_node_id(line)){
			mosquitto_log_printf(MOSQ_LOG_WARNING,
					"fluidos_retain: %s: '%s' is not a node id, skipped", cfg.revoked_path, line);
			continue;
		}
		if(out->count == MAX_REVOKED){
			mosquitto_log_printf(MOSQ_LOG_ERR, "fluidos_retain: %s holds more than %d ids",
					cfg.revoked_path, MAX_REVOKED);
			fclose(f);
			free(out->ids);
			out->ids = NULL;
			out->count = 0;
			return false;
		}
		if(out->count == cap){
			void *more = realloc(out->ids, 2 * cap * sizeof(out->ids[0]));
			if(more == NULL){
				fclose(f);
				free(out->ids);
				out->ids = NULL;
				out->count = 0;
				return false;
			}
			out->ids = more;
			cap *= 2;
		}
		memcpy(out->ids[out->count++], line, n + 1);
	}
	fclose(f);
	qsort(out->ids, out->count, sizeof(out->ids[0]), compare_ids);
	return true;
}

/* Re-reads the list; the ids not in the previous one become pending (cut off at the next
 * tick). With `all`, every id is pending (at start: clears adverts kept in mosquitto.db). */
static void reload_revoked(bool all)
{
	struct revoked fresh;
	size_t i;

	if(cfg.revoked_path == NULL || !read_revoked(&fresh)){
		return;
	}
	free(cfg.pending.ids);
	cfg.pending.ids = NULL;
	cfg.pending.count = 0;
	if(fresh.count > 0){
		cfg.pending.ids = malloc(fresh.count * sizeof(fresh.ids[0]));
	}
	for(i = 0; cfg.pending.ids != NULL && i < fresh.count; i++){
		if(all || !is_revoked(&cfg.revoked, fresh.ids[i])){
			memcpy(cfg.pending.ids[cfg.pending.count++], fresh.ids[i], sizeof(fresh.ids[0]));
		}
	}
	free(cfg.revoked.ids);
	cfg.revoked = fresh;
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "fluidos_retain: %lu revoked node ids, %lu new",
			(unsigned long)cfg.revoked.count, (unsigned long)cfg.pending.count);
}

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	reload_revoked(false);
	return MOSQ_ERR_SUCCESS;
}

/* Cuts the pending ids off. Run on a tick, not inside the reload, so that mosquitto's own
 * reload steps (which walk every session) are over. */
static int on_tick(int event, void *event_data, void *userdata)
{
	size_t i;
	char topic[sizeof(cfg.prefix) + MAX_NODE_ID + 1];
	(void)event;
	(void)event_data;
	(void)userdata;

	for(i = 0; i < cfg.pending.count; i++){
		mosquitto_kick_client_by_username(cfg.pending.ids[i], true);
		snprintf(topic, sizeof(topic), "%s%s", cfg.prefix, cfg.pending.ids[i]);
		mosquitto_broker_publish_copy(NULL, topic, 0, NULL, 1, true, NULL);
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"fluidos_retain: revoked node %s cut off and its catalog entry cleared",
				cfg.pending.ids[i]);
	}
	cfg.pending.count = 0;
	return MOSQ_ERR_SUCCESS;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *user;
	bool catalog, own_catalog;
	(void)event;
	(void)userdata;

	user = mosquitto_client_username(ed->client);
	if(user != NULL && is_revoked(&cfg.revoked, user)){
		refused("any access by a revoked node", user, ed->topic ? ed->topic : "", 0);
		return MOSQ_ERR_ACL_DENIED;
	}
	if(user != NULL && strncmp(user, SUPERNODE_PREFIX, strlen(SUPERNODE_PREFIX)) == 0
			&& (ed->access == MOSQ_ACL_WRITE || ed->access == MOSQ_ACL_READ)
			&& supernode_check(ed, user) == MOSQ_ERR_ACL_DENIED){
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access != MOSQ_ACL_WRITE){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	catalog = user != NULL && ed->topic != NULL
		&& strncmp(ed->topic, cfg.prefix, cfg.prefix_len) == 0;
	if(catalog && strncmp(user, BRIDGE_PREFIX, strlen(BRIDGE_PREFIX)) == 0){
		/* A site's bridge speaks for every node of its site: any node's entry, but not a
		 * revoked node's advert (a site that has not heard of the revocation yet). */
		own_catalog = valid_node_id(ed->topic + cfg.prefix_len);
		if(own_catalog && ed->payloadlen > 0 && is_revoked(&cfg.revoked, ed->topic + cfg.prefix_len)){
			refused("a revoked node's advert", user, ed->topic, ed->payloadlen);
			return MOSQ_ERR_ACL_DENIED;
		}
	}else{
		own_catalog = catalog && strcmp(ed->topic + cfg.prefix_len, user) == 0;
	}
	if(own_catalog){
		if(ed->payloadlen > cfg.max_catalog_bytes){
			refused("an oversized catalog entry", user, ed->topic, ed->payloadlen);
			return MOSQ_ERR_ACL_DENIED;
		}
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	if(ed->retain && ed->payloadlen > 0){
		refused("a retained message", user, ed->topic ? ed->topic : "", ed->payloadlen);
		return MOSQ_ERR_ACL_DENIED;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5){
			return 5;
		}
	}
	return -1;
}

static bool valid_domain(const char *d)
{
	size_t n = strlen(d);
	if(n == 0 || n > MAX_DOMAIN){
		return false;
	}
	for(; *d; d++){
		char c = *d;
		bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
			|| c == '.' || c == '_' || c == '-';
		if(!ok){
			return false;
		}
	}
	return true;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *opts, int opt_count)
{
	const char *domain = NULL;
	int i;
	(void)userdata;

	memset(&cfg, 0, sizeof(cfg));
	cfg.max_catalog_bytes = DEFAULT_MAX_CATALOG_BYTES;
	for(i = 0; i < opt_count; i++){
		if(strcmp(opts[i].key, "domain") == 0){
			domain = opts[i].value;
		}else if(strcmp(opts[i].key, "revoked") == 0){
			free(cfg.revoked_path);
			cfg.revoked_path = strdup(opts[i].value);
			if(cfg.revoked_path == NULL){
				return MOSQ_ERR_NOMEM;
			}
		}else if(strcmp(opts[i].key, "max_catalog_bytes") == 0){
			char *end = NULL;
			unsigned long v = strtoul(opts[i].value, &end, 10);
			if(end == opts[i].value || *end != '\0' || v == 0 || v > 268435455ul){
				mosquitto_log_printf(MOSQ_LOG_ERR,
						"fluidos_retain: max_catalog_bytes '%s' is not a number of bytes (1..268435455)",
						opts[i].value);
				return MOSQ_ERR_INVAL;
			}
			cfg.max_catalog_bytes = (uint32_t)v;
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR, "fluidos_retain: unknown option plugin_opt_%s",
					opts[i].key);
			return MOSQ_ERR_INVAL;
		}
	}
	if(domain == NULL || !valid_domain(domain)){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"fluidos_retain: plugin_opt_domain is missing or not an id (A-Z a-z 0-9 . _ -, at most 48)");
		return MOSQ_ERR_INVAL;
	}
	snprintf(cfg.prefix, sizeof(cfg.prefix), "fluidos/v1/%s/catalog/", domain);
	cfg.prefix_len = strlen(cfg.prefix);
	snprintf(cfg.to_prefix, sizeof(cfg.to_prefix), "fluidos/v1/%s/to/", domain);
	cfg.to_prefix_len = strlen(cfg.to_prefix);
	plugin_id = identifier;
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			"fluidos_retain: retained messages only on %s{node}, at most %u bytes",
			cfg.prefix, (unsigned)cfg.max_catalog_bytes);
	if(cfg.revoked_path != NULL){
		struct revoked probe;
		if(!read_revoked(&probe)){
			return MOSQ_ERR_INVAL;
		}
		free(probe.ids);
		reload_revoked(true);
		if(mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL)
				|| mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL)){
			return MOSQ_ERR_UNKNOWN;
		}
	}
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *opts, int opt_count)
{
	(void)userdata;
	(void)opts;
	(void)opt_count;
	if(cfg.revoked_path != NULL){
		mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
		mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
	}
	free(cfg.revoked.ids);
	free(cfg.pending.ids);
	free(cfg.revoked_path);
	cfg.revoked.ids = cfg.pending.ids = NULL;
	cfg.revoked.count = cfg.pending.count = 0;
	cfg.revoked_path = NULL;
	return mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
}
