#include "ulsp/core/tls_files.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "kernel/msgport/own_file.h"
#include "ulsp/core/agent.h"

namespace ulsp::core {
namespace {

template <auto F>
struct Free {
  template <typename T>
  void operator()(T* p) const noexcept { F(p); }
};
using Bio = std::unique_ptr<BIO, Free<BIO_free>>;
using Cert = std::unique_ptr<X509, Free<X509_free>>;
using Key = std::unique_ptr<EVP_PKEY, Free<EVP_PKEY_free>>;

Bio Memory(const std::string& pem) { return Bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()))); }

Cert ParseCert(const std::string& pem) {
  Bio bio = Memory(pem);
  return Cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
}

// "Mar  1 12:00:00 2027 GMT"
std::string Time(const ASN1_TIME* t) {
  Bio bio(BIO_new(BIO_s_mem()));
  if (!bio || ASN1_TIME_print(bio.get(), t) != 1) return "?";
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

}  // namespace

std::expected<TlsFiles, std::string> ReadTlsFiles(const std::string& cert_path, const std::string& key_path,
                                                  const std::string& ca_path) {
  if (cert_path.empty() || key_path.empty() || ca_path.empty())
    return std::unexpected("TLS needs --tls-cert, --tls-key and --tls-ca together");
  // What the parsers leave in OpenSSL's error queue goes, whatever the outcome: kj-tls
  // reads that queue too, and would blame its own next failure on it.
  struct ClearErrors {
    ~ClearErrors() { ERR_clear_error(); }
  } clear;
  TlsFiles f;
  auto cert_text = ReadTextFile(cert_path, 1u << 20);
  if (!cert_text) return std::unexpected("--tls-cert " + cert_path + ": " + cert_text.error());
  f.cert = std::move(*cert_text);
  auto key = ReadSecretFile(key_path);
  if (!key) return std::unexpected(key.error());
  f.key = std::move(*key);
  auto ca_text = ReadTextFile(ca_path, 1u << 20);
  if (!ca_text) return std::unexpected("--tls-ca " + ca_path + ": " + ca_text.error());
  f.ca = std::move(*ca_text);

  const Cert cert = ParseCert(f.cert);
  if (!cert) return std::unexpected("--tls-cert " + cert_path + ": not a PEM certificate (-----BEGIN CERTIFICATE-----)");
  if (!ParseCert(f.ca)) return std::unexpected("--tls-ca " + ca_path + ": not a PEM certificate (-----BEGIN CERTIFICATE-----)");
  Key pkey;
  if (Bio bio = Memory(f.key)) pkey.reset(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!pkey)
    return std::unexpected("--tls-key " + key_path +
                           ": not a PEM private key without a passphrase (-----BEGIN PRIVATE KEY-----)");
  if (X509_check_private_key(cert.get(), pkey.get()) != 1)
    return std::unexpected("--tls-key " + key_path + " is not the private key of --tls-cert " + cert_path);
  if (X509_cmp_current_time(X509_get0_notBefore(cert.get())) >= 0)
    return std::unexpected("--tls-cert " + cert_path + " is not valid before " + Time(X509_get0_notBefore(cert.get())));
  if (X509_cmp_current_time(X509_get0_notAfter(cert.get())) <= 0)
    return std::unexpected("--tls-cert " + cert_path + " expired on " + Time(X509_get0_notAfter(cert.get())));
  return f;
}

}  // namespace ulsp::core
